"""Test-wide JAX settings.

* `rbg` keys: model init compiles one random op per parameter shape, which
  threefry makes slow on CPU (ENVIRONMENT: 9-25 s per ResNet).
* Full float32 matmul precision: halting decisions are threshold comparisons.
"""

import os

os.environ.setdefault('JAX_DEFAULT_PRNG_IMPL', 'rbg')

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_default_prng_impl', 'rbg')
jax.config.update('jax_default_matmul_precision', 'highest')
