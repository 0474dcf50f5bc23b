r"""Training-step time of CIFAR ResNets, vanilla vs ACT vs SACT, and compile time.

Run by hand (not a test):

  python -m benchmarks.train_step --depths=32,110 --batch_size=128
  python -m benchmarks.train_step --compile_only --depths=20,110

Prints a table and writes JSON (`--out`). Every configuration runs in this
process one after another, so ratios within one run are comparable; absolute
times on a shared machine are noisy. The step is forward + backward + SGD
momentum update, loss = CE + 0.01 ponder + L2 2e-4 (as the reference's).
"""

import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sact_jax import models

_DEPTHS = flags.DEFINE_list('depths', ['32', '110'], 'CIFAR ResNet depths.')
_TYPES = flags.DEFINE_list('model_types', ['vanilla', 'act', 'sact'],
                           'Model types.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Batch size.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed steps (median).')
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False, 'Only measure jit compile time (SACT), scan vs '
    'unrolled.')
_VARIANTS = flags.DEFINE_list(
    'variants', ['scan'], 'scan, unrolled, scan_slowconv (no custom conv '
    'backward), scan_remat.')
_OUT = flags.DEFINE_string('out', 'benchmarks/results/train_step.json',
                           'JSON output path.')

_VARIANT_KWARGS = {
    'scan': {},
    'unrolled': {'unroll': True},
    'scan_slowconv': {'fast_conv_backward': False},
    'scan_remat': {'remat': True},
}


def make_step(model, weight_decay=2e-4, tau=0.01):
  """A jitted SGD training step, as the trainer's but self-contained."""
  optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9),
                            wrt=nnx.Param)

  @nnx.jit(donate_argnums=(0, 1))
  def step(model, optimizer, images, labels):
    def loss_fn(model):
      logits, aux = model(images)
      ce = optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
      l2 = sum(jnp.sum(p ** 2) for p in jax.tree.leaves(
          nnx.state(model, nnx.Param)) if p.ndim >= 2)
      return ce + tau * aux['ponder_loss'] + weight_decay * 0.5 * l2
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  return optimizer, step


def time_config(depth, model_type, variant, batch, repeats, compile_only):
  kwargs = _VARIANT_KWARGS[variant]
  model = models.create_model('cifar', depth, model_type, num_classes=10,
                              rngs=nnx.Rngs(0), **kwargs)
  model.train()
  optimizer, step = make_step(model)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, size=(batch,)), jnp.int32)
  t0 = time.perf_counter()
  compiled = step.lower(model, optimizer, images, labels).compile()
  compile_s = time.perf_counter() - t0
  del compiled
  result = {'depth': depth, 'model_type': model_type, 'variant': variant,
            'batch_size': batch, 'compile_s': compile_s}
  if compile_only:
    return result
  step(model, optimizer, images, labels).block_until_ready()  # Warm-up.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    step(model, optimizer, images, labels).block_until_ready()
    times.append(time.perf_counter() - t0)
  result['step_s'] = float(np.median(times))
  return result


def main(argv):
  del argv
  jax.config.update('jax_default_prng_impl', 'rbg')
  results = []
  types = ['sact'] if _COMPILE_ONLY.value else _TYPES.value
  for depth in [int(d) for d in _DEPTHS.value]:
    for variant in _VARIANTS.value:
      for model_type in types:
        r = time_config(depth, model_type, variant, _BATCH.value,
                        _REPEATS.value, _COMPILE_ONLY.value)
        results.append(r)
        print(json.dumps(r), flush=True)
  # Table.
  print(f'\n{"depth":>5} {"variant":>14} {"type":>8} {"compile s":>10} '
        f'{"step s":>8} {"/vanilla":>9}')
  for r in results:
    base = [b for b in results if b['depth'] == r['depth']
            and b['variant'] == r['variant'] and b['model_type'] == 'vanilla']
    ratio = (r['step_s'] / base[0]['step_s']
             if base and 'step_s' in r else float('nan'))
    print(f'{r["depth"]:>5} {r["variant"]:>14} {r["model_type"]:>8} '
          f'{r["compile_s"]:>10.2f} {r.get("step_s", float("nan")):>8.3f} '
          f'{ratio:>9.2f}')
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump({'device': str(jax.devices()[0]), 'results': results}, f,
              indent=1)


if __name__ == '__main__':
  app.run(main)
