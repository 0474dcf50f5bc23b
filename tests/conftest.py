"""Test-wide JAX settings.

* `rbg` keys: model init compiles one random op per parameter shape, which
  threefry makes slow on CPU (9-25 s per ResNet on a busy 2-core machine).
* Full float32 matmul precision, globally: halting decisions are threshold
  comparisons, and most tests compare two computations of the same model
  (scan vs loop, sparse vs dense, 8 devices vs 1, ours vs the reference's
  outputs) exactly on `num_units`. At the default precision a GPU may use
  TF32, whose rounding moves positions near the threshold to another unit;
  those tests would then need loose bounds that hide real bugs. On the CPU
  this changes nothing (float32 at every precision). What users run, the
  default precision, is covered by `sparse_test.DefaultPrecisionTest`.
* One CPU device in the test processes, whatever `XLA_FLAGS` says: tests of
  several devices start processes of their own (`multidevice_test.py`),
  and the tests of oneDNN's routing need it on, which it is only on one
  device (`onednn.enabled`).
"""

import os

os.environ.setdefault('JAX_DEFAULT_PRNG_IMPL', 'rbg')
os.environ['XLA_FLAGS'] = ' '.join(
    flag for flag in os.environ.get('XLA_FLAGS', '').split()
    if not flag.startswith('--xla_force_host_platform_device_count'))

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_default_prng_impl', 'rbg')
jax.config.update('jax_default_matmul_precision', 'highest')
