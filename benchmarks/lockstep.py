"""Lockstep timing: warm processes that take turns on the machine.

On a shared VM the same program's speed drifts by up to 1.5x within
minutes (BUILD.md, "Where the time goes (CPU)"), so two processes timed one
after the other can land in different phases, and a ratio of their medians
measures the VM as much as the code. Here each side is a server that builds
and warms its workload, prints a ready line, then times one call of each of
its workloads whenever the driver writes `run`; the driver asks the sides
in turn (the order reversed every other round), so the calls of one round
see the same machine state and the ratio is taken per round. The idle
side waits on its stdin and uses no CPU.

Pure Python without JAX or TF: the TF server (benchmarks/tf_server.py)
imports it from the TF port's venv.
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable


def emit(record: dict) -> None:
  """One protocol line (servers print nothing else starting with '{')."""
  sys.stdout.write(json.dumps(record) + '\n')
  sys.stdout.flush()


def serve(calls: dict[str, Callable[[], object]], info: dict) -> None:
  """The server side: warms `calls`, then times them once per `run` line.

  Args:
    calls: name -> a call that returns once its work is done (block on
      asynchronous results inside it).
    info: what the ready line reports besides `ready` (e.g. the FLOPs).
  """
  for fn in calls.values():
    for _ in range(2):
      fn()
  emit({'ready': True, **info})
  for line in sys.stdin:
    command = line.strip()
    if command == 'quit':
      return
    if command != 'run':
      emit({'error': f'unknown command {command!r}'})
      continue
    times = {}
    for name, fn in calls.items():
      start = time.perf_counter()
      fn()
      times[name] = time.perf_counter() - start
    emit(times)


class ServerError(RuntimeError):
  """A server exited or answered something other than a protocol line."""


class Client:
  """The driver's handle on one server process."""

  def __init__(self, name: str, command: list[str], env: dict):
    self.name = name
    self._stderr = tempfile.TemporaryFile(mode='w+')
    self._proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=self._stderr, text=True, env=env)

  def _read(self) -> dict:
    for line in self._proc.stdout:
      if line.startswith('{'):
        record = json.loads(line)
        if 'error' in record:
          raise ServerError(f'{self.name}: {record["error"]}')
        return record
    self._proc.wait()
    self._stderr.seek(0)
    tail = self._stderr.read().strip().splitlines()[-1:]
    raise ServerError(f'{self.name} exited with {self._proc.returncode}: '
                      f'{tail[0] if tail else "no message"}')

  def ready(self) -> dict:
    """Blocks until the server has built and warmed its workload."""
    return self._read()

  def run(self) -> dict[str, float]:
    """Seconds of one call of each of the server's workloads."""
    self._proc.stdin.write('run\n')
    self._proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    if self._proc.poll() is None:
      try:
        self._proc.stdin.write('quit\n')
        self._proc.stdin.flush()
        self._proc.wait(timeout=60)
      except (BrokenPipeError, subprocess.TimeoutExpired):
        self._proc.kill()
        self._proc.wait()
    self._stderr.close()


def rounds(clients: list[Client], count: int) -> list[dict[str, dict]]:
  """`count` rounds, each asking every client once; order flips per round.

  Returns one `{client name: {workload: seconds}}` per round.
  """
  out = []
  for r in range(count):
    order = clients if r % 2 == 0 else clients[::-1]
    out.append({c.name: c.run() for c in order})
  return out


def median_ratio(per_round: list[dict[str, dict]], numerator: tuple[str, str],
                 denominator: tuple[str, str]) -> float | None:
  """Median over rounds of one (client, workload) time over another's."""
  ratios = [r[numerator[0]][numerator[1]] / r[denominator[0]][denominator[1]]
            for r in per_round
            if numerator[1] in r.get(numerator[0], {})
            and denominator[1] in r.get(denominator[0], {})]
  return statistics.median(ratios) if ratios else None
