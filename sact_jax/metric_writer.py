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
  """TensorBoard scalars and JSON lines; a no-op except on process 0."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      # tensorboardX: event files without TensorFlow.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(
          os.path.join(workdir, TENSORBOARD_DIR), flush_secs=30)
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')

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

  def close(self) -> None:
    if self._active:
      self._tb.close()
      self._jsonl.close()
      self._active = False


def format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s'
