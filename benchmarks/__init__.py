"""Benchmarks, run by hand (BUILD.md, "Benchmarks")."""

import os

# JAX's persistent compilation cache of the benchmarks' JAX processes: a
# process that loads its programs from it runs them at full speed under
# `sact_jax.host_memory`, one that compiled them itself does not (BUILD.md,
# "Host memory").
CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'sact_jax_jit')
