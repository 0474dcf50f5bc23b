"""Data parallelism: 8 devices and 2 processes compute what 1 device does.

Device counts and `jax.distributed` are fixed once per process, so the
multi-device runs happen in subprocesses (`tests/train_helpers.py`); the
single-device references run in this process.
"""

import json
import os
import subprocess
import sys

from absl.testing import absltest
import jax
import numpy as np
import portpicker

from sact_jax import train
import train_helpers

_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'train_helpers.py')
_CACHE_DIR = train_helpers.enable_compilation_cache()
_TIMEOUT_S = 300


def _env(**extra) -> dict[str, str]:
  env = dict(os.environ)
  env.update({'JAX_PLATFORMS': 'cpu', 'SACT_TEST_JAX_CACHE': _CACHE_DIR})
  env.pop('XLA_FLAGS', None)
  env.update(extra)
  return env


def _load(out: str, process: int = 0) -> tuple[dict[str, np.ndarray], dict]:
  with np.load(os.path.join(out, f'state_{process}.npz')) as f:
    flat = dict(f)
  with open(os.path.join(out, f'info_{process}.json')) as f:
    info = json.load(f)
  return flat, info


def _assert_states_close(test, actual, expected, rtol=1e-4, atol=1e-5):
  test.assertEqual(sorted(actual), sorted(expected))
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], rtol=rtol,
                               atol=atol, err_msg=key)


class EightDevicesTest(absltest.TestCase):

  def test_same_parameters_as_one_device(self):
    """3 SGD steps on a batch split over 8 devices = on 1 device."""
    out = train_helpers.tempdir(self)
    proc = subprocess.run(
        [sys.executable, _HELPER, 'devices', f'--out={out}'],
        env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=8'),
        capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    multi, info = _load(out)

    self.assertEqual(jax.device_count(), 1)
    single, losses, _ = train_helpers.run_steps(
        train_helpers.tiny_config(),
        train_helpers.synthetic_batches(train_helpers.NUM_STEPS))

    self.assertEqual(info['device_count'], 8)
    self.assertEqual(info['batch_devices'], 8)
    self.assertEqual(info['rows_per_device'], [2] * 8)
    self.assertTrue(info['all_reduce'], 'no all-reduce in the 8-device step')
    np.testing.assert_allclose(info['losses'], losses, rtol=1e-5)
    # The run changed the parameters (the comparison is not vacuous).
    initial = train.Trainer.create(train_helpers.tiny_config(),
                                   train.make_mesh()).init_state()
    kernel = "['params']['stem_conv']['kernel']"
    self.assertGreater(
        np.abs(single[kernel] - train_helpers.flat_state(initial)[kernel])
        .max(), 1e-3)
    _assert_states_close(self, multi, single)
    # A global batch that 8 devices cannot split is refused up front.
    self.assertIn('batch_size=12 is not divisible by the 8 devices',
                  info['batch_error'])


class TwoProcessesTest(absltest.TestCase):

  def test_same_parameters_as_one_process(self):
    """2 processes (own data shards, gloo collectives) = 1 process."""
    data_dir = train_helpers.tempdir(self)
    workdir = train_helpers.tempdir(self)
    out = train_helpers.tempdir(self)
    config = train_helpers.tiny_config(data_dir)
    # Prepared once here: two processes would both generate it.
    references = [iter(train.make_train_dataset(config, i, 2))
                  for i in range(2)]

    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen(
        [sys.executable, _HELPER, 'multihost', f'--out={out}',
         f'--port={port}', f'--process_id={i}', f'--data_dir={data_dir}',
         f'--workdir={workdir}'],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for i in range(2)]
    outputs = []
    try:
      for proc in procs:
        outputs.append(proc.communicate(timeout=_TIMEOUT_S)[0])
    finally:
      for proc in procs:
        proc.kill()
    for i, proc in enumerate(procs):
      self.assertEqual(proc.returncode, 0,
                       f'process {i}:\n{outputs[i][-3000:]}')

    # The reference: one process, one device, each global batch made of
    # shard 0's rows then shard 1's (the mesh's process order).
    batches = []
    for _ in range(train_helpers.NUM_STEPS):
      parts = [next(it) for it in references]
      batches.append({k: np.concatenate([p[k] for p in parts])
                      for k in ('image', 'label')})
    single, _, _ = train_helpers.run_steps(config, batches)

    for process in range(2):
      multi, info = _load(out, process)
      self.assertEqual(info['process_count'], 2)
      self.assertEqual(info['device_count'], 2)
      self.assertFalse(info['preempted'])
      _assert_states_close(self, multi, single)
    # Each host saved its own data iterator position.
    step_dir = os.path.join(workdir, train.CHECKPOINT_DIR,
                            str(train_helpers.NUM_STEPS), 'data')
    self.assertContainsSubset(['process_0-of-2.json', 'process_1-of-2.json'],
                              os.listdir(step_dir))
    self.assertTrue(os.path.exists(os.path.join(workdir,
                                                train.METRICS_FILE)))


if __name__ == '__main__':
  absltest.main()
