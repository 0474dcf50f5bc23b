"""Host memory that XLA:CPU can reuse without page faults.

XLA:CPU allocates every output and temporary buffer of a call afresh and
frees it afterwards. Under glibc, a buffer larger than a thread arena
(64 MiB) is always its own `mmap`, returned to the system when freed, so
the next call writes to new pages and takes a page fault per 4 KiB. On a
virtual machine that is slow: writing a fresh 100 MB map cost 31 ms where
writing it in place (a donated buffer) cost 3 ms (2-core EPYC VM,
`x * 2` on `[32, 56, 56, 256]`). The sparse path, a chain of jitted phases
each returning large maps, paid it on every phase: ImageNet ResNet-101 at
batch 32 ran 17% faster once freed memory stayed in the process (BUILD.md,
"Host memory").

`reuse_freed_memory` tells glibc to keep freed memory: one arena for all
threads (so any size comes from the main heap), no `mmap` for large
blocks, no trimming of the heap's top. The process then holds on to its
peak memory, as TensorFlow's own allocator does. The launchers under
experiments/ call it; call it yourself first thing in a program that runs
sact_jax on the CPU.

The price of one arena: compiling leaves thousands of free chunks of odd
sizes in it, and glibc sorts every block above 1 KiB that XLA frees at run
time into its bin by walking those sizes, under the arena's lock. A
process that compiled its programs itself thus runs them up to 1.4x slower
(ImageNet `sparse.apply` at batch 1) than one that loaded them from JAX's
persistent compilation cache; give the process one (the launchers do).
"""

import ctypes
import ctypes.util

# (tunable name, mallopt parameter from glibc's malloc.h, value): one arena,
# no mmap, never trim (the largest value M_TRIM_THRESHOLD, an int, takes).
_SETTINGS = (('arena_max', -8, 1), ('mmap_max', -4, 0),
             ('trim_threshold', -1, 2**31 - 1))

# The same settings for a process started from outside (glibc reads them at
# start-up): e.g. the original TF code, timed side by side with sact_jax.
GLIBC_TUNABLES = ':'.join(f'glibc.malloc.{name}={value}'
                          for name, _, value in _SETTINGS)

# With this tunable glibc (2.35 and later) advises the kernel to back its
# heap and large blocks with transparent huge pages (2 MiB), where the
# kernel's THP mode is `madvise` (under `always` they get them unasked): a
# network's weights and maps then take hundreds of TLB entries instead of
# tens of thousands. Read at start-up only (`mallopt` has no such option),
# so it is for child processes (`with_tunables`) or the shell. BUILD.md
# ("Host memory") has what it measured.
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'


def with_tunables(env: dict, *tunables: str) -> dict:
  """`env` with `tunables` added to its GLIBC_TUNABLES (for a child)."""
  parts = [p for p in env.get('GLIBC_TUNABLES', '').split(':') if p]
  names = {t.split('=')[0] for t in tunables}
  parts = [p for p in parts if p.split('=')[0] not in names] + list(tunables)
  return dict(env, GLIBC_TUNABLES=':'.join(parts))


def reuse_freed_memory() -> bool:
  """Makes glibc keep freed memory for reuse; False where it cannot.

  Call it before JAX starts its CPU backend (the first array or jit call):
  threads that already have an arena of their own keep it. Where the C
  library is not glibc (no `mallopt`), nothing changes.
  """
  name = ctypes.util.find_library('c')
  try:
    mallopt = ctypes.CDLL(name).mallopt
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  return all(mallopt(param, value) == 1 for _, param, value in _SETTINGS)
