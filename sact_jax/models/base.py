"""What the CIFAR and ImageNet ResNets share: blocks, aux and input checks."""

from flax import nnx
import jax
import jax.numpy as jnp

from sact_jax import flops as flops_lib


def check_images(images: jax.Array):
  """One clear error for images that no ResNet here can take.

  An empty batch is refused too: in training its batch statistics are NaN
  and would overwrite every BatchNorm's running averages. So are integer
  images (`check_image_dtype`).
  """
  if not (hasattr(images, 'shape') and hasattr(images, 'dtype')):
    raise TypeError('images must be a jax or numpy array, got '
                    f'{type(images).__name__}.')
  shape = tuple(images.shape)
  if len(shape) != 4 or shape[-1] != 3 or min(shape) < 1:
    raise ValueError(
        'Expected images shaped [batch, height, width, 3] (NHWC, RGB, no '
        f'empty dimension), got shape {shape}.')
  check_image_dtype(images.dtype)


def check_image_dtype(dtype):
  """Refuses integer and bool images, which would run as raw [0, 255] values.

  The models take float images normalised as their training data (CIFAR
  standardised per image, ImageNet in [-1, 1]); an image loaded with PIL is
  uint8 and must go through `data.preprocess_image` first.
  """
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f'images have dtype {jnp.dtype(dtype).name}: the models take float '
        'images normalised as their training data; use '
        "data.preprocess_image('cifar' or 'imagenet', image) per image.")


class AdaptiveResNet(nnx.Module):
  """Stem, blocks, head; subclasses build the three parts.

  Calling the model returns `(logits_BxK, aux)`, where `aux` holds:
    flops: `[B]` FLOPs per image (reference convention);
    ponder_cost, num_units: one entry per block, `[B]` for ACT and
      `[B, H, W]` for SACT (empty lists for vanilla);
    ponder_loss: scalar `sum_blocks mean(ponder_cost)`, the term the loss
      multiplies by tau (0 for vanilla).
  """
  blocks: nnx.List
  model_type: str

  def stem(self, images: jax.Array, counter: flops_lib.FlopCounter):
    raise NotImplementedError

  def head(self, x: jax.Array, counter: flops_lib.FlopCounter):
    raise NotImplementedError

  def run_blocks(self, x: jax.Array, counter: flops_lib.FlopCounter,
                 start: int = 0, stop: int | None = None
                 ) -> tuple[jax.Array, dict]:
    """Blocks `start..stop-1` on `x`; their output and aux.

    The aux has `ponder_cost`, `num_units` (the blocks' entries) and
    `ponder_loss` (their sum of means); FLOPs go to `counter`. The model's
    call runs all blocks; a detection backbone runs a prefix, its box
    classifier the rest.
    """
    ponder_costs, num_units = [], []
    for block in list(self.blocks)[start:stop]:
      x, block_aux = block(x, counter)
      if block_aux:
        ponder_costs.append(block_aux['ponder_cost'])
        num_units.append(block_aux['num_units'])
    ponder_loss = sum((jnp.mean(p) for p in ponder_costs),
                      jnp.zeros((), jnp.float32))
    return x, {'ponder_cost': ponder_costs, 'num_units': num_units,
               'ponder_loss': ponder_loss}

  def __call__(self, images_BxHxWx3: jax.Array, *,
               counter: flops_lib.FlopCounter | None = None
               ) -> tuple[jax.Array, dict]:
    check_images(images_BxHxWx3)
    counter = flops_lib.FlopCounter() if counter is None else counter
    x = self.stem(images_BxHxWx3, counter)
    x, aux = self.run_blocks(x, counter)
    logits = self.head(x, counter)
    aux = {'flops': counter.per_image(images_BxHxWx3.shape[0]), **aux}
    return logits, aux
