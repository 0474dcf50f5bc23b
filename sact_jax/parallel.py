"""The device mesh of data parallelism, and moving batches onto it.

One mesh with a single 'data' axis over every device of every host. Each host
reads its own shard of the data; its batch rows become its devices' rows of a
global batch (`jax.make_array_from_process_local_data`). Model state is
replicated, and XLA inserts the all-reduces (gradients and BatchNorm
statistics are over the global batch, so 1 and N devices compute the same
step). Training, evaluation and restoring share this one mesh, so that
replicated weights move between them without copies.
"""

from typing import Any

from flax import nnx
import jax
import numpy as np


def make_mesh(devices: Any = None) -> jax.sharding.Mesh:
  """A 1-D 'data' mesh over `devices` (default: all devices of all hosts).

  Auto axis type (jax.make_mesh's default is Explicit in jax 0.10): the
  model carries no sharding annotations, so XLA propagates the batch
  sharding from the inputs and inserts the collectives.
  """
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def check_platform(mesh: jax.sharding.Mesh) -> None:
  """Refuses a mesh of accelerators in a process whose default is the CPU.

  Models pick their CPU paths (oneDNN custom calls) by JAX's default
  backend when they are built and traced; programs of such a model do not
  run on a GPU or TPU.

  Raises:
    ValueError: one line saying how to make the accelerator the default.
  """
  platform = mesh.devices.flat[0].platform
  if jax.default_backend() == 'cpu' and platform != 'cpu':
    raise ValueError(
        f'The mesh is on {platform} but JAX\'s default backend is the CPU, '
        'whose models call oneDNN: make the accelerator the default (e.g. '
        f'JAX_PLATFORMS={platform},cpu, not cpu,{platform}).')


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharded(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))


def to_global(mesh: jax.sharding.Mesh, local: np.ndarray) -> jax.Array:
  """This host's rows -> one global array sharded over the 'data' axis."""
  return jax.make_array_from_process_local_data(batch_sharded(mesh),
                                                np.asarray(local))


def fetch(x: Any) -> np.ndarray:
  """A replicated (possibly multi-host) array as numpy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(x)


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                keys: tuple[str, ...] = ('image', 'label')
                ) -> dict[str, jax.Array]:
  """This host's batch rows -> global arrays sharded over the 'data' axis."""
  return {k: to_global(mesh, batch[k]) for k in keys}


def local_copy(module: Any) -> Any:
  """`module` with its (replicated) arrays copied to this host's devices.

  With several hosts, a picture drawn by process 0 alone must not touch
  global arrays (that would wait for the other hosts).
  """
  if jax.process_count() == 1:
    return module
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, jax.tree.map(fetch, state))
