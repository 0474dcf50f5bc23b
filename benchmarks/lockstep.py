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

A side may also be several servers, each pinned to its own CPUs and given
its share of the batch (`ShardedClient`): they run each workload at once,
and the side's time is the slowest shard's. That is how a batch is served
on a multi-core CPU by one single-threaded process per core, with no
synchronisation between the cores inside any operation.

Pure Python without JAX or TF: the TF server (benchmarks/tf_server.py)
imports it from the TF port's venv.
"""

import json
import os
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

  `run` times every workload in turn, `run NAME` that one alone.

  Args:
    calls: name -> a call that returns once its work is done (block on
      asynchronous results inside it).
    info: what the ready line reports besides `ready` and `workloads` (e.g.
      the FLOPs).
  """
  for fn in calls.values():
    for _ in range(2):
      fn()
  emit({'ready': True, 'workloads': list(calls), **info})
  for line in sys.stdin:
    words = line.split()
    if words == ['quit']:
      return
    names = words[1:]
    if words[:1] != ['run'] or not set(names) <= set(calls):
      emit({'error': f'unknown command {line.strip()!r}'})
      continue
    times = {}
    for name in names or calls:
      fn = calls[name]
      start = time.perf_counter()
      fn()
      times[name] = time.perf_counter() - start
    emit(times)


class ServerError(RuntimeError):
  """A server exited or answered something other than a protocol line."""


class Client:
  """The driver's handle on one server process.

  Args:
    name: the server's name in rounds and errors.
    command: what starts it.
    env: its environment.
    cpus: the CPUs it may run on (its affinity), or None for the driver's.
    cwd: its working directory, or None for the driver's.
  """

  def __init__(self, name: str, command: list[str], env: dict,
               cpus: set[int] | None = None, cwd: str | None = None):
    self.name = name
    self._stderr = tempfile.TemporaryFile(mode='w+')
    pin = None if cpus is None else lambda: os.sched_setaffinity(0, cpus)
    self._proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=self._stderr, text=True, env=env, preexec_fn=pin, cwd=cwd)

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

  def send(self, *workloads: str) -> None:
    """Asks for one call of these workloads (all of them if none)."""
    self._proc.stdin.write(' '.join(('run',) + workloads) + '\n')
    self._proc.stdin.flush()

  def receive(self) -> dict[str, float]:
    """The answer to `send`: seconds per workload."""
    return self._read()

  def run(self) -> dict[str, float]:
    """Seconds of one call of each of the server's workloads."""
    self.send()
    return self.receive()

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


def cpu_shards(count: int) -> list[set[int]]:
  """This process's CPUs dealt into `count` disjoint, nonempty sets."""
  cpus = sorted(os.sched_getaffinity(0))
  if not 1 <= count <= len(cpus):
    raise ValueError(f'{count} shards: this process may use {len(cpus)} '
                     f'CPUs, so 1 to {len(cpus)} shards.')
  return [set(cpus[k::count]) for k in range(count)]


class ShardedClient:
  """One side as several servers, each on its own CPUs with part of the
  batch; quacks like `Client`.

  Each round asks every shard for one workload at a time, so the shards
  run the same workload together, and takes the slowest shard's seconds:
  the time the whole batch took.
  """

  def __init__(self, name: str, commands: list[list[str]], env: dict,
               cpus: list[set[int]]):
    if len(commands) != len(cpus):
      raise ValueError(f'{len(commands)} commands for {len(cpus)} CPU sets.')
    self.name = name
    self._shards = [Client(f'{name}[{k}]', command, env, shard_cpus)
                    for k, (command, shard_cpus)
                    in enumerate(zip(commands, cpus))]
    self._workloads = None

  def ready(self) -> dict:
    """Blocks until every shard is ready; their ready lines by shard."""
    infos = [shard.ready() for shard in self._shards]
    self._workloads = infos[0]['workloads']
    return {'ready': True, 'workloads': self._workloads, 'shards': infos}

  def run(self) -> dict[str, float]:
    """Seconds of one call of each workload, the slowest shard's."""
    times = {}
    for workload in self._workloads:
      for shard in self._shards:
        shard.send(workload)
      times[workload] = max(shard.receive()[workload]
                            for shard in self._shards)
    return times

  def close(self) -> None:
    for shard in self._shards:
      shard.close()


def rounds(clients: list[Client | ShardedClient],
           count: int) -> list[dict[str, dict]]:
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
