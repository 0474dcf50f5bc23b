"""How every launcher under experiments/ ends on bad input.

One convention for all of them, so scripts and people can rely on it:

* bad input (flags, config, paths, checkpoints, datasets, a missing
  optional dependency), refused before any work: one `error: ...` line on
  stderr, exit status 2 (`BAD_INPUT`);
* a failure during the run (e.g. a non-finite loss): one `error: ...` line,
  exit status 1 (`RUN_FAILED`).

Neither prints a traceback: the user has something to fix, not a bug to
report. Launchers call `run(main)` instead of `absl.app.run(main)`.
"""

import sys
from typing import Callable, NoReturn, Sequence

from absl import app
from absl import flags

BAD_INPUT = 2
RUN_FAILED = 1


def fail(message: str, status: int = BAD_INPUT) -> NoReturn:
  """One error line on stderr, no traceback."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def one_line(error: BaseException) -> str:
  """The first and last lines of a message that may embed a traceback."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  return lines[0] if len(lines) == 1 else f'{lines[0]} {lines[-1]}'


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parsing, but bad flags end with one line and exit status 2.

  ml_collections puts the config file's whole traceback into the flag error
  (e.g. for an unknown variant); only its first and last lines are kept.
  """
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # Raised by ml_collections for --config.<field> that the config lacks.
    fail(f'Unknown config field {str(e).strip(chr(34))}: overrides can only '
         'set fields that the config file defines.')
  except (flags.Error, TypeError, ValueError) as e:
    fail(one_line(e))


def config_value(config_flag: flags.FlagHolder):
  """The config of a `config_flags` flag, or one line if it cannot load.

  A config file that cannot be read is only reported on first use, after
  flag parsing.
  """
  try:
    config = config_flag.value
    if config is not None:
      config.get('dataset')
    return config
  except OSError as e:
    fail(one_line(e))


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` with this module's conventions for bad input.

  `app.UsageError`s raised by `main` (absl would print the whole usage text
  and exit 1) end as one line with exit status 2 too.
  """
  def checked_main(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      fail(one_line(e))

  app.run(checked_main, flags_parser=parse_flags)
