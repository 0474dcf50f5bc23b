r"""Throughput (images/s) of the training input pipelines on this machine.

Measures `sact_jax.data.make_dataset` with training augmentation for
CIFAR-shaped data: the `sact_shapes` train split (prepared in `--data_dir` if
needed) and `cifar10` under `tfds.testing.mock_data` (random images, same
shapes and preprocessing), each with several preprocessing worker counts.
Compare the figures with the images/s a training step consumes.

  python -m benchmarks.input_pipeline --workers=0,1,2 \
      --out=/tmp/input_pipeline.json
"""

import os
import platform
import tempfile
import time

from absl import app
from absl import flags
import tensorflow_datasets as tfds

import benchmarks
from sact_jax import data
from sact_jax.data import shapes

_DATA_DIR = flags.DEFINE_string(
    'data_dir', os.path.join(tempfile.gettempdir(), 'sact_benchmark_data'),
    'tfds data_dir; sact_shapes is generated there if missing.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 128, 'Batch size.')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'],
                             'Preprocessing worker counts to measure.')
_DATASETS = flags.DEFINE_list('datasets', ['sact_shapes', 'cifar10_mock'],
                              'Pipelines to measure.')
_WARMUP = flags.DEFINE_integer('warmup_batches', 10,
                               'Batches read before timing (starts workers).')
_BATCHES = flags.DEFINE_integer('batches', 100, 'Batches timed.')
_OUT = flags.DEFINE_string(
    'out', benchmarks.default_out('input_pipeline.json'),
    'Where to write the results as JSON.')
_OVERWRITE = benchmarks.define_overwrite_flag()
flags.adopt_module_key_flags(benchmarks)

_PIPELINES = ('sact_shapes', 'cifar10_mock')


def check_flags() -> list[int]:
  """One-line UsageError for a bad `--workers`, `--warmup_batches` or
  `--batches` (also train_throughput's), before any pipeline starts: they
  used to fail after the first pipeline's timing. Returns the workers."""
  workers = benchmarks.check_positive_ints(_WORKERS, minimum=0)
  benchmarks.check_at_least(0, _WARMUP)
  benchmarks.check_at_least(1, _BATCHES)
  return workers


def _measure(name: str, workers: int) -> dict[str, float]:
  """Reads warm-up batches, then times `--batches` batches."""
  ds = data.make_dataset(name, 'train', batch_size=_BATCH_SIZE.value,
                         train=True, seed=0, data_dir=_DATA_DIR.value,
                         worker_count=workers)
  start = time.perf_counter()
  iterator = iter(ds)
  for _ in range(_WARMUP.value):
    next(iterator)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(iterator)
  seconds = time.perf_counter() - start
  if hasattr(iterator, 'close'):
    iterator.close()  # Stops worker processes.
  return {
      'images_per_s': _BATCHES.value * _BATCH_SIZE.value / seconds,
      'ms_per_batch': 1000 * seconds / _BATCHES.value,
      'warmup_s': first,
  }


def _time_generation() -> dict[str, float]:
  """Seconds to generate sact_shapes in memory and to prepare it as tfds."""
  start = time.perf_counter()
  for split, size in (('train', 20_000), ('test', 2_000)):
    shapes.generate_examples(size, shapes.SPLIT_SEEDS[split])
  generate_s = time.perf_counter() - start
  result = {'generate_22k_s': generate_s}
  builder = tfds.builder('sact_shapes', data_dir=_DATA_DIR.value,
                         file_format='array_record')
  if not builder.is_prepared():
    start = time.perf_counter()
    builder.download_and_prepare()
    result['prepare_22k_s'] = time.perf_counter() - start
  for name, seconds in result.items():
    print(f'sact_shapes {name}: {seconds:.1f}')
  return result


def main(argv):
  del argv
  benchmarks.check_choices(_DATASETS, _PIPELINES)
  worker_counts = check_flags()
  benchmarks.check_at_least(1, _BATCH_SIZE)
  out = benchmarks.check_output(_OUT.value, 'out', _OVERWRITE.value)
  generation = (_time_generation() if 'sact_shapes' in _DATASETS.value
                else {})
  rows = []
  for pipeline in _DATASETS.value:
    for workers in worker_counts:
      if pipeline == 'cifar10_mock':
        # Random images from the tfds mock: the real files' decoding cost is
        # not measured (PIL: about 0.1 ms per 32x32 PNG here).
        with tfds.testing.mock_data(num_examples=50_000):
          result = _measure('cifar10', workers)
      else:
        result = _measure(pipeline, workers)
      row = {'pipeline': pipeline, 'workers': workers, **result}
      rows.append(row)
      print(f'{pipeline:>14} workers={workers}: '
            f'{row["images_per_s"]:8.0f} images/s '
            f'({row["ms_per_batch"]:6.1f} ms/batch of {_BATCH_SIZE.value}, '
            f'warm-up {row["warmup_s"]:.1f} s)', flush=True)

  print('\n| pipeline | workers | images/s | ms/batch |')
  print('| --- | --- | --- | --- |')
  for row in rows:
    print(f'| {row["pipeline"]} | {row["workers"]} | '
          f'{row["images_per_s"]:.0f} | {row["ms_per_batch"]:.1f} |')
  benchmarks.write_json(out, {
      'batch_size': _BATCH_SIZE.value,
      'batches': _BATCHES.value,
      'cpu_count': os.cpu_count(),
      'machine': platform.processor() or platform.machine(),
      'sact_shapes_generation': generation,
      'results': rows,
  }, indent=2)
  print(f'Wrote {out}')


if __name__ == '__main__':
  app.run(main)
