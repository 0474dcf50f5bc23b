r"""Training throughput of a config's model vs what its input pipeline delivers.

Three figures, in one process, for `--config` (default: the main job):

* train step: steps/s and images/s of the jitted data-parallel step on
  batches already in memory (what training consumes);
* input pipeline: images/s of the config's training pipeline alone, for
  each `--workers` count (`benchmarks/input_pipeline.py`'s measurement);
* end to end: steps/s when the step is fed by the pipeline (worker count
  `--e2e_workers`), as `sact_jax.train.train` does. If this is close to the
  train-step figure, the pipeline is not the bottleneck.

  python -m benchmarks.train_throughput \
      --config=sact_jax/configs/default.py --steps=30 --workers=0,1

The pipeline's flags come from benchmarks/input_pipeline.py: `--workers`,
`--data_dir`, `--warmup_batches` and `--batches` apply here; its
`--batch_size`, `--datasets` and `--out` do not (the batch size is the
config's, `--config.batch_size`; the dataset the config's; the output
`--json_out`) and are refused rather than ignored.

Prints a table and writes JSON to `--json_out`. Timings on a shared machine
are noisy: compare figures within one run.
"""

import os
import platform
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

import benchmarks
from benchmarks import input_pipeline

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), 'sact_jax', 'configs', 'default.py'),
    'Training config whose model and pipeline are measured.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Timed training steps.')
_WARMUP_STEPS = flags.DEFINE_integer(
    'warmup_steps', 3, 'Untimed steps after the compiling first one.')
_E2E_WORKERS = flags.DEFINE_integer(
    'e2e_workers', 0, 'Pipeline workers of the end-to-end measurement.')
_JSON_OUT = flags.DEFINE_string(
    'json_out', benchmarks.default_out('train_throughput.json'),
    'Where to write the results as JSON.')
_OVERWRITE = benchmarks.define_overwrite_flag()
# `--help` lists the pipeline's flags that apply here, and `--overwrite`.
for _name in ('workers', 'data_dir', 'warmup_batches', 'batches'):
  flags.declare_key_flag(_name)
flags.adopt_module_key_flags(benchmarks)

# input_pipeline's flags that this benchmark does not use, with what does.
_REFUSED = {'out': '--json_out', 'batch_size': '--config.batch_size',
            'datasets': "the config's dataset (--config.dataset)"}


def _check_flags(config) -> str:
  """One-line UsageError for a bad or unused flag, before anything is
  built: --out or --batch_size used to be ignored without a word (and the
  JSON to land on the committed file). Returns the output path."""
  from sact_jax.configs import validation  # pylint: disable=g-import-not-at-top
  for name, instead in _REFUSED.items():
    if flags.FLAGS[name].present:
      raise app.UsageError(f'--{name} is input_pipeline\'s and unused here: '
                           f'use {instead}.')
  benchmarks.check_at_least(1, _STEPS)
  benchmarks.check_at_least(0, _WARMUP_STEPS, _E2E_WORKERS)
  input_pipeline.check_flags()
  try:
    validation.validate_config(config)
  except validation.ConfigError as e:
    raise app.UsageError(f'--config: {e}') from None
  return benchmarks.check_output(_JSON_OUT.value, 'json_out',
                                 _OVERWRITE.value)


def _time_steps(trainer, state, batches) -> tuple[float, object]:
  """Seconds per step over `batches` (an iterator of host batches)."""
  from sact_jax import parallel  # pylint: disable=g-import-not-at-top
  for _ in range(_WARMUP_STEPS.value):
    state, _ = trainer.train_step(
        state, parallel.shard_batch(next(batches), trainer.mesh))
  jax.block_until_ready(state)  # Also with no warm-up step.
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = trainer.train_step(
        state, parallel.shard_batch(next(batches), trainer.mesh))
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / _STEPS.value, state


def main(argv):
  del argv
  config = _CONFIG.value
  out = _check_flags(config)
  jax.config.update('jax_default_prng_impl', 'rbg')
  from sact_jax import parallel  # pylint: disable=g-import-not-at-top
  from sact_jax import train  # pylint: disable=g-import-not-at-top
  from sact_jax.configs import validation  # pylint: disable=g-import-not-at-top
  batch_size = config.batch_size
  mesh = parallel.make_mesh()
  info = {
      'config': validation.model_spec(config).to_dict(),
      'dataset': config.dataset,
      'batch_size': batch_size,
      'devices': jax.device_count(),
      'cpu_count': os.cpu_count(),
      'machine': platform.processor() or platform.machine(),
  }
  print(f'Model: {info["config"]}, batch {batch_size}, '
        f'{jax.device_count()} device(s)', flush=True)

  # 1. The step alone, on one synthetic batch in memory.
  start = time.perf_counter()
  trainer = train.Trainer.create(config, mesh)
  state = trainer.init_state()
  jax.block_until_ready(state)
  init_s = time.perf_counter() - start
  size = config.image_size
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(batch_size, size, size, 3)).astype(
               np.float32),
           'label': rng.integers(0, config.num_classes, batch_size).astype(
               np.int32)}
  start = time.perf_counter()
  state, metrics = trainer.train_step(state, parallel.shard_batch(batch, mesh))
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start

  def same_batch():
    while True:
      yield batch
  step_s, state = _time_steps(trainer, state, same_batch())
  rows = [{'what': 'train step (batches in memory)',
           'steps_per_s': 1 / step_s, 'images_per_s': batch_size / step_s}]
  print(f'init {init_s:.1f} s, first step (compile) {compile_s:.1f} s, '
        f'{1 / step_s:.2f} steps/s', flush=True)

  # 2. The input pipeline alone, at the config's batch size.
  flags.FLAGS.batch_size = batch_size
  if config.get('data_dir'):
    flags.FLAGS.data_dir = config.data_dir
  for workers in map(int, flags.FLAGS.workers):
    result = input_pipeline._measure(config.dataset, workers)  # pylint: disable=protected-access
    rows.append({'what': f'input pipeline, {workers} worker(s)',
                 'steps_per_s': result['images_per_s'] / batch_size,
                 'images_per_s': result['images_per_s']})
    print(f'pipeline workers={workers}: {result["images_per_s"]:.0f} '
          'images/s', flush=True)

  # 3. The step fed by the pipeline, as in training.
  config.unlock()
  config.data_dir = flags.FLAGS.data_dir
  config.data_workers = _E2E_WORKERS.value
  iterator = iter(train.make_train_dataset(config))
  e2e_s, state = _time_steps(trainer, state, iterator)
  if hasattr(iterator, 'close'):
    iterator.close()
  rows.append({'what': f'train step fed by the pipeline '
                       f'({_E2E_WORKERS.value} worker(s))',
               'steps_per_s': 1 / e2e_s, 'images_per_s': batch_size / e2e_s})

  print('\n| measurement | steps/s | images/s |')
  print('| --- | --- | --- |')
  for row in rows:
    print(f'| {row["what"]} | {row["steps_per_s"]:.2f} | '
          f'{row["images_per_s"]:.0f} |')
  print(f'\ninit {init_s:.1f} s, compile + first step {compile_s:.1f} s; '
        f'pipeline slowdown of training: {100 * (e2e_s / step_s - 1):+.0f}%')
  benchmarks.write_json(out, {
      **info, 'init_s': init_s, 'compile_s': compile_s,
      'steps': _STEPS.value, 'results': rows}, indent=2)
  print(f'Wrote {out}')


if __name__ == '__main__':
  app.run(main)
