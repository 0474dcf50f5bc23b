"""sact_jax: Spatially Adaptive Computation Time ResNets in JAX/Flax NNX."""

__version__ = '0.1.0'
