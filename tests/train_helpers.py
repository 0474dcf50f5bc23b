r"""Shared pieces of the training tests, and the script their subprocesses run.

As a module: a tiny config, synthetic batches, `run_steps` and flattening of
train states, used in-process by `train_test.py` and `multidevice_test.py`.

As a script (the multi-device tests start it in fresh processes, because the
device count and `jax.distributed` are fixed once per process):

  # All devices of one process (the caller sets XLA_FLAGS to fake 8 or 2),
  # on synthetic batches or on the global batches saved in an npz file:
  python tests/train_helpers.py devices --out=DIR [--batches=FILE.npz]
  # One of 2 processes joined through jax.distributed on localhost:
  python tests/train_helpers.py multihost --out=DIR --port=P --process_id=I \
      --data_dir=D --workdir=W
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import jax

if __name__ == '__main__':
  # As in tests/conftest.py, before any computation.
  jax.config.update('jax_default_prng_impl', 'rbg')
  jax.config.update('jax_default_matmul_precision', 'highest')

import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from sact_jax import checkpoint  # pylint: disable=g-import-not-at-top
from sact_jax import parallel  # pylint: disable=g-import-not-at-top
from sact_jax import loop  # pylint: disable=g-import-not-at-top
from sact_jax import train  # pylint: disable=g-import-not-at-top
from sact_jax.configs import default  # pylint: disable=g-import-not-at-top
from sact_jax.configs import validation  # pylint: disable=g-import-not-at-top

NUM_STEPS = 3
GLOBAL_BATCH = 16


def enable_compilation_cache() -> str:
  """A persistent XLA cache shared by the test processes (big win on CPU).

  Must run before the first compilation of the process.
  """
  directory = os.environ.get('SACT_TEST_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'sact_jax', 'test_jax_cache')
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return directory


def tempdir(test) -> str:
  """A fresh directory removed after `test` (absltest's create_tempdir
  needs parsed absl flags, which pytest does not provide)."""
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def tiny_config(data_dir: str | None = None,
                **overrides) -> ml_collections.ConfigDict:
  """A SACT model small enough to compile and train in seconds.

  Two units in the first block, so that it has a halting head and a
  ponder cost that depends on the weights.
  """
  config = default.get_config('smoke')
  config.unlock()
  config.dataset = 'sact_shapes/tiny'
  config.data_dir = data_dir
  config.units = (2, 1, 1)
  config.base_channels = 4
  config.batch_size = GLOBAL_BATCH
  config.eval_batch_size = 32
  config.num_train_steps = 4
  # Fixed here, not inherited from the main job's choices: the tests'
  # expectations (and the multi-device investigation) use these.
  config.tau = 0.01
  config.learning_rate = 0.1
  config.lr_schedule = 'piecewise'
  config.lr_boundaries = (2,)
  config.lr_scales = (0.5,)
  config.eval_every_steps = 0
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.num_eval_examples = 32
  config.num_ponder_maps = 2
  for key, value in overrides.items():
    config[key] = value
  return config


def synthetic_batches(num: int, batch_size: int = GLOBAL_BATCH,
                      seed: int = 0) -> list[dict[str, np.ndarray]]:
  """Deterministic random images and labels (6 classes)."""
  rng = np.random.default_rng(seed)
  return [{'image': rng.normal(size=(batch_size, 32, 32, 3)).astype(
              np.float32),
           'label': rng.integers(0, 6, batch_size).astype(np.int32)}
          for _ in range(num)]


def flat_state(state: train.TrainState) -> dict[str, np.ndarray]:
  """Every array of a train state by path, as numpy (process-local copy)."""
  tree = checkpoint.to_pure(loop.state_tree(state))
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): parallel.fetch(leaf)
          for path, leaf in flat}


def run_steps(config: ml_collections.ConfigDict,
              batches: list[dict[str, np.ndarray]]
              ) -> tuple[list[dict[str, np.ndarray]], list[float],
                         train.Trainer]:
  """Trains from scratch on `batches` (global batches) on all devices.

  Returns:
    The flattened state before the first step and after every step (so
    `states[-1]` is the final one), the loss of every step and the trainer.
  """
  mesh = parallel.make_mesh()
  trainer = train.Trainer.create(config, mesh)
  state = trainer.init_state()
  states, losses = [flat_state(state)], []
  for batch in batches:
    local = {k: v[_local_rows(len(v))] for k, v in batch.items()}
    state, metrics = trainer.train_step(state,
                                        parallel.shard_batch(local, mesh))
    states.append(flat_state(state))
    losses.append(float(parallel.fetch(metrics['loss'])))
  return states, losses, trainer


def save_batches(path: str, batches: list[dict[str, np.ndarray]]) -> None:
  np.savez(path, **{f'{key}_{i}': value for i, batch in enumerate(batches)
                    for key, value in batch.items()})


def load_batches(path: str) -> list[dict[str, np.ndarray]]:
  with np.load(path) as f:
    num = len(f.files) // 2
    return [{'image': f[f'image_{i}'], 'label': f[f'label_{i}']}
            for i in range(num)]


def _local_rows(global_rows: int) -> slice:
  """This process's rows of a global batch (processes in mesh order)."""
  per_process = global_rows // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def _save(out: str, flat: dict[str, np.ndarray], info: dict,
          name: str = 'state') -> None:
  os.makedirs(out, exist_ok=True)
  np.savez(os.path.join(out, f'{name}_{jax.process_index()}.npz'), **flat)
  with open(os.path.join(out, f'info_{jax.process_index()}.json'), 'w') as f:
    json.dump(info, f)


def _devices_main(args) -> None:
  """`run_steps` on every device of this process; plus sharding checks."""
  config = tiny_config(args.data_dir)
  batches = (load_batches(args.batches) if args.batches
             else synthetic_batches(NUM_STEPS))
  states, losses, trainer = run_steps(config, batches)
  # After the first step too: the tests compare both.
  _save(args.out, states[1], {}, name='first')
  batch = parallel.shard_batch(synthetic_batches(1)[0], trainer.mesh)
  hlo = trainer.train_step.lower(trainer.init_state(), batch).compile(
  ).as_text()
  try:
    validation.validate_config(tiny_config(batch_size=12))
    batch_error = None
  except validation.ConfigError as e:
    batch_error = str(e)
  _save(args.out, states[-1], {
      'device_count': jax.device_count(),
      'batch_devices': len(batch['image'].sharding.device_set),
      'rows_per_device': [s.data.shape[0]
                          for s in batch['image'].addressable_shards],
      'all_reduce': 'all-reduce' in hlo,
      'losses': losses,
      'batch_error': batch_error,
  })


def _multihost_main(args) -> None:
  """One process of a 2-process run of the real training loop."""
  jax.distributed.initialize(
      coordinator_address=f'localhost:{args.port}', num_processes=2,
      process_id=args.process_id)
  config = tiny_config(args.data_dir, num_train_steps=NUM_STEPS,
                       checkpoint_every_steps=2)
  result = train.train(config, args.workdir)
  _save(args.out, flat_state(result.state), {
      'process_count': jax.process_count(),
      'device_count': jax.device_count(),
      'preempted': result.preempted,
  })


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('mode', choices=['devices', 'multihost'])
  parser.add_argument('--out', required=True)
  parser.add_argument('--port', type=int)
  parser.add_argument('--process_id', type=int)
  parser.add_argument('--data_dir')
  parser.add_argument('--workdir')
  parser.add_argument('--batches')
  args = parser.parse_args()
  enable_compilation_cache()
  if args.mode == 'devices':
    _devices_main(args)
  else:
    _multihost_main(args)


if __name__ == '__main__':
  sys.exit(main())
