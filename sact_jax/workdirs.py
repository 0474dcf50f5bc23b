"""Output directories checked before any work starts.

A run that writes its results only at the end (training, evaluation,
ponder maps) should not find out after minutes or days that its directory
cannot be made; launchers call `ensure_writable_dir` (or, for one output
file, `ensure_writable_file`) first and report `WorkdirError` in one line.
"""

import os
import tempfile


class WorkdirError(ValueError):
  """A directory that cannot be created or written; one line."""


def ensure_writable_dir(path: str) -> None:
  """Creates `path` (and its parents) if needed and checks files can go in.

  Writes and removes a probe file: permission bits do not tell (root passes
  `os.access` where `mkdir` fails, e.g. under /proc; read-only mounts, full
  quotas). If the check fails, the directories this call made are removed
  again, so a failed check leaves nothing behind.

  Args:
    path: the directory.

  Raises:
    WorkdirError: `path` cannot be created, or is not a writable directory.
  """
  if not path:
    raise WorkdirError('The directory path is empty.')
  path = os.path.abspath(path)
  missing = []  # Deepest first: the order to remove them in.
  parent = path
  while not os.path.lexists(parent):
    missing.append(parent)
    parent = os.path.dirname(parent)
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.write_check_'):
      pass
  except OSError as e:
    for directory in missing:
      try:
        os.rmdir(directory)
      except OSError:
        pass  # Not made by this call (a concurrent run) or never made.
    if os.path.lexists(path) and not os.path.isdir(path):
      reason = 'it exists and is not a directory'
    else:
      reason = e.strerror or str(e) or type(e).__name__
    raise WorkdirError(
        f'Cannot create or write to the directory {path}: {reason}.') from None


def ensure_writable_file(path: str) -> None:
  """`ensure_writable_dir` for the directory of an output file to come.

  Also refuses a path that is a directory: the file would replace it only
  at the end, after the work (and fail there).

  Raises:
    WorkdirError: `path` is a directory, or its directory cannot be written.
  """
  if not path:
    raise WorkdirError('The output path is empty.')
  if os.path.isdir(path):
    raise WorkdirError(f'The output path {os.path.abspath(path)} is a '
                       'directory; give a file name.')
  ensure_writable_dir(os.path.dirname(os.path.abspath(path)))
