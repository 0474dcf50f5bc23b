"""Training summaries: TensorBoard, `metrics.jsonl`, human-readable times.

TensorBoard files are written with tensorboardX (no TensorFlow needed); every
record also goes to one JSON line, so a run's numbers can be read with plain
Python. Only process 0 writes.
"""

import json
import os
import time

import jax
import numpy as np

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


class MetricWriter:
  """TensorBoard scalars and JSON lines; a no-op except on process 0.

  A run resumed from its step-`start_step` checkpoint (0: none) trains the
  steps after it again: the records an interrupted process wrote for them
  are dropped (JSON lines rewritten; TensorBoard's purge step), so every
  step is recorded once, in order.
  """

  def __init__(self, workdir: str, start_step: int = 0):
    self._active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, METRICS_FILE)
      if os.path.exists(path):
        _drop_records_after(path, start_step)
      tb_dir = os.path.join(workdir, TENSORBOARD_DIR)
      # tensorboardX: event files without TensorFlow.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(
          tb_dir, flush_secs=30,
          purge_step=start_step + 1 if os.path.isdir(tb_dir) else None)
      self._jsonl = open(path, 'a')

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self._active:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    record = {'step': step, 'time': time.time(), **scalars}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()

  def write_image(self, step: int, tag: str, image_HxWx3: np.ndarray) -> None:
    """An RGB uint8 picture, shown in TensorBoard's Images tab."""
    if self._active:
      self._tb.add_image(tag, image_HxWx3, step, dataformats='HWC')

  def flush(self) -> None:
    """Writes out what TensorBoard buffers (before a checkpoint)."""
    if self._active:
      self._tb.flush()

  def close(self) -> None:
    if self._active:
      self._tb.close()
      self._jsonl.close()
      self._active = False


def _drop_records_after(path: str, step: int) -> None:
  """Rewrites the JSON lines at `path` without records after `step`.

  A line cut short by a killed process is dropped too.
  """
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and record.get('step', 0) <= step:
        kept.append(line if line.endswith('\n') else line + '\n')
  temp = path + '.tmp'
  with open(temp, 'w') as f:
    f.writelines(kept)
  os.replace(temp, path)


def format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s'
