r"""GPU kernels per call of the models, counted without a GPU.

XLA compiles a program for a CUDA target it is only told about (a
compile-only device made from a target description; no GPU, driver or
CUDA runtime needed), and the optimised program lists every kernel it
launches: each fusion, library call (cuDNN, cuBLAS) and copy, with the
trip count of each loop. At batch 1 an H200 runs a ResNet in a few
milliseconds, a few microseconds per kernel, so the kernels per call are
what the time follows (BUILD.md, "ACT and SACT over vanilla on a GPU").

Needs JAX's CUDA plugin in the environment, e.g. a venv of its own:

  python3.11 -m venv /tmp/gpu-venv
  /tmp/gpu-venv/bin/pip install -e . "jax[cuda12]==$(python -c \
      'import jax; print(jax.__version__)')"
  JAX_PLATFORMS=cpu /tmp/gpu-venv/bin/python -m benchmarks.gpu_kernels

Models are built as on a GPU (`fast_conv_backward=False`: XLA's own
convolutions), in evaluation for the forward. The training step is the
forward and gradient of cross-entropy + 0.01 ponder cost and a plain SGD
update (the trainer's without its metrics and momentum), its units
rematerialised where the trainer's config has them so (`--remat_families`).
Besides the kernels it adds up the bytes they read and write: at batch 32
and above the elementwise kernels are bound by memory traffic. Prints a
table and writes JSON (`--out`); `--sources` and `--list_mb` print where
the bytes go (by JAX op; kernel by kernel in each loop body).
"""

import time

from absl import app
from absl import flags
from flax import nnx
import jax
from jax.experimental import topologies
import jax.numpy as jnp
import optax

import benchmarks
from benchmarks import hlo_counts
from sact_jax.models import create_model

_PROGRAMS = flags.DEFINE_list(
    'programs', ['forward:cifar:1', 'forward:imagenet:1', 'forward:cifar:32',
                 'forward:imagenet:32', 'train:cifar:128',
                 'train:imagenet:64'],
    'kind:family:batch of each program (kind: forward or train).')
_TYPES = flags.DEFINE_list('model_types', ['vanilla', 'act', 'sact'],
                           'Model types.')
_UNROLL = flags.DEFINE_bool('unroll', False,
                            'Unrolled blocks instead of scans.')
_REMAT = flags.DEFINE_list(
    'remat_families', ['imagenet'],
    'Families whose training steps rematerialise the scanned units, as the '
    "trainer's configs have them (ImageNet ResNet-101: `remat=True`).")
_REMAT_MODE = flags.DEFINE_enum(
    'remat_mode', 'all', ['all', 'convs'],
    "How those families rematerialise: the whole unit (`remat=True`) or "
    "all but the convolutions' outputs (`remat='convs'`).")
_SOURCES = flags.DEFINE_integer(
    'sources', 0, 'Also print, per program, this many of what its kernels '
    'compute for JAX (forward or backward op), most bytes first.')
_LIST_MB = flags.DEFINE_float(
    'list_mb', None, 'Also print, per program, each loop body once (with '
    'its trip count) and its kernels that move at least this many MB a '
    'launch: what they read and write and compute for JAX.')
_OUT = flags.DEFINE_string('out', benchmarks.default_out('gpu_kernels.json'),
                           'JSON output path.')
_OVERWRITE = benchmarks.define_overwrite_flag()
flags.adopt_module_key_flags(benchmarks)

_MODELS = benchmarks.MODELS

# An H100/H200-class device (compute capability 9.0, 132 multiprocessors,
# 50 MiB of L2), in the fields of XLA's GpuTargetConfigProto this jaxlib
# reads. Fusion decisions depend on these, timings on nothing here.
_TARGET = '''
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 4800000000000
  l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 150000000000 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H200"
'''

def _build(family: str, model_type: str, remat: bool | str):
  model = _MODELS[family]
  return create_model(family, model['depth'], model_type,
                      num_classes=model['num_classes'], rngs=nnx.Rngs(0),
                      fast_conv_backward=False, remat=remat,
                      unroll=_UNROLL.value)


def compile_program(kind: str, family: str, model_type: str, batch: int,
                    sharding) -> str:
  """The optimised HLO of one program, compiled for the target."""
  remat = kind == 'train' and family in _REMAT.value and (
      True if _REMAT_MODE.value == 'all' else 'convs')
  abstract = nnx.eval_shape(lambda: _build(family, model_type, remat))
  if kind == 'forward':
    abstract.eval()
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  spec = lambda tree: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      tree)
  size = _MODELS[family]['size']
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32,
                                sharding=sharding)
  if kind == 'forward':
    fn = jax.jit(lambda p, r, x: nnx.merge(graphdef, p, r)(x))
    return fn.lower(spec(params), spec(rest), images).compile().as_text()

  def step(params, rest, images, labels):
    def loss_fn(params, rest):
      rest = jax.tree.map(lambda x: x, rest)  # Fresh BatchNorm statistics.
      model = nnx.merge(graphdef, params, rest)
      logits, aux = model(images)
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
      loss = loss + 0.01 * aux.get('ponder_loss', 0.0)
      return loss, nnx.split(model, nnx.Param, ...)[2]
    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, rest)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), rest, loss

  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)
  fn = jax.jit(step, donate_argnums=(0, 1))
  return fn.lower(spec(params), spec(rest), images,
                  labels).compile().as_text()


def _print_loop_bodies(kernels: list[dict], min_mb: float) -> None:
  """Each loop body once: its kernels, MB moved a trip, and those of its
  kernels that move at least `min_mb` MB (MB read, written, kind, result
  shape, JAX source)."""
  bodies = {}
  for k in kernels:
    if loops := hlo_counts.loop_body(k):
      bodies.setdefault(loops, []).append(k)
  for loops, body in bodies.items():
    name, trips, _ = loops[-1]
    moved = sum(k['read'] + k['written'] for k in body) / 1e6
    print(f'    loop {name} x{trips} (depth {len(loops)}): {len(body)} '
          f'kernels, {moved:.1f} MB a trip')
    for k in body:
      if (k['read'] + k['written']) / 1e6 >= min_mb:
        print(f'      {k["read"] / 1e6:8.1f} {k["written"] / 1e6:8.1f}  '
              f'{k["kind"][:20]:<20} {k["shape"][:44]:<44} '
              f'{k["source"][:50]}')


def _check_flags() -> str:
  """One-line UsageError for a bad flag, before anything compiles; returns
  the output path."""
  for program in _PROGRAMS.value:
    fields = program.split(':')
    if (len(fields) != 3 or fields[0] not in ('forward', 'train')
        or fields[1] not in _MODELS or not fields[2].isdigit()
        or int(fields[2]) < 1):
      raise app.UsageError(f'--programs entry {program!r} is not KIND:FAMILY:'
                           f'BATCH (KIND forward or train, FAMILY '
                           f'{" or ".join(_MODELS)}, BATCH >= 1).')
  benchmarks.check_choices(_TYPES, ('vanilla', 'act', 'sact'),
                           empty_ok=True)
  benchmarks.check_choices(_REMAT, _MODELS, empty_ok=True)
  benchmarks.check_at_least(0, _SOURCES)
  if _LIST_MB.value is not None:
    benchmarks.check_at_least(0, _LIST_MB)
  return benchmarks.check_output(_OUT.value, 'out', _OVERWRITE.value)


def _topology():
  """The compile-only CUDA target, or a one-line UsageError where this
  Python has no CUDA plugin for JAX (it used to end in a traceback)."""
  try:
    return topologies.get_topology_desc(
        platform='cuda', topology_name='', topology='1x1x1',
        target_config=_TARGET)
  except NotImplementedError as e:
    raise app.UsageError(
        f"needs JAX's CUDA plugin (jax[cuda12]) in this Python ({e}); the "
        'module docstring shows a venv with it.') from None


def main(argv):
  del argv
  out = _check_flags()
  topology = _topology()
  mesh = topologies.make_mesh(topology, (1,), ('x',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rows = []
  print(f'{"program":<20} {"type":<8} {"kernels":>8} {"/vanilla":>9} '
        f'{"read GB":>8} {"written GB":>10} {"/vanilla":>9} '
        f'{"per loop iteration":<24}')
  # Vanilla first, whatever the order given: the others' ratios need it.
  types = sorted(_TYPES.value, key=lambda t: t != 'vanilla')
  for program in _PROGRAMS.value:
    kind, family, batch = program.split(':')
    base = None
    for model_type in types:
      t0 = time.perf_counter()
      hlo = compile_program(kind, family, model_type, int(batch), sharding)
      counts = hlo_counts.count_kernels(hlo)
      row = {'program': program, 'model_type': model_type,
             'unroll': _UNROLL.value,
             'compile_s': time.perf_counter() - t0, **counts}
      moved = row['read_mb'] + row['written_mb']
      if model_type == 'vanilla':
        base = (row['kernels'], moved)
      row['vs_vanilla'] = row['kernels'] / base[0] if base else None
      row['bytes_vs_vanilla'] = moved / base[1] if base else None
      rows.append(row)
      print(f'{program:<20} {model_type:<8} {row["kernels"]:>8} '
            f'{row["vs_vanilla"] or float("nan"):>9.2f} '
            f'{row["read_mb"] / 1e3:>8.2f} {row["written_mb"] / 1e3:>10.2f} '
            f'{row["bytes_vs_vanilla"] or float("nan"):>9.2f} '
            f'{str(sorted(set(row["loop_bodies"]))):<24}', flush=True)
      for source in row['sources'][:_SOURCES.value]:
        print(f'    {source["source"][:40]:<40} {source["launches"]:>7} '
              f'launches {source["mb"] / 1e3:>8.2f} GB', flush=True)
      if _LIST_MB.value is not None:
        _print_loop_bodies(hlo_counts.list_kernels(hlo), _LIST_MB.value)
  benchmarks.write_json(out, {
      'jax': jax.__version__, 'target': 'H200 (sm_90), compile-only',
      'rows': rows})
  print(f'Wrote {out}')


if __name__ == '__main__':
  app.run(main)
