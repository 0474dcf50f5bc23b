r"""The original TF code's inference as a lockstep server (for vs_original.py).

Runs in the TF port's venv (`bash ../shared/tfref/setup.sh`), started by
`python -m benchmarks.vs_original --lockstep`; not part of sact_jax. Builds
the original's eval-mode network (`imagenet_model.get_network` or
`cifar_model.resnet` under their `resnet_arg_scope(is_training=False)`) on
random normal images held in a variable, as the port's own harness does,
with 2 intra- and 2 inter-op threads (`--threads`) and no XLA. `--halt`
overwrites every halting branch (weights 0, bias -10: nothing halts early;
+10: everything halts after the first unit) so that both sides compute the
same units.
Workloads: `dense` (the model type as built) and, for ACT, `sparse` (the
original's `act_early_stopping` mode, a second graph). With `--train`
(CIFAR only) the one workload `dense` is a training step of the original's
cifar_main.py instead: softmax cross-entropy, tau (0.01) times each
block's mean ponder cost, the arg scope's L2 regularisers, momentum SGD
(0.9) and slim's train op (BatchNorm updates, numerics checks, the global
step); images and one-hot labels held in variables.

  ~/.cache/sact-tfref/venv/bin/python benchmarks/tf_server.py \
      --family=imagenet --depth=101 --model_type=vanilla --batch=1
"""

import functools
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lockstep  # pylint: disable=g-import-not-at-top,wrong-import-position

_TFREF = flags.DEFINE_string(
    'tfref_dir', os.path.expanduser('~/.cache/sact-tfref'),
    'The TF port (../shared/tfref/setup.sh).')
_FAMILY = flags.DEFINE_enum('family', 'imagenet', ['cifar', 'imagenet'],
                            'Model family.')
_DEPTH = flags.DEFINE_integer('depth', 101, 'Network depth.')
_TYPE = flags.DEFINE_enum('model_type', 'vanilla', ['vanilla', 'act', 'sact'],
                          'Model type.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Batch size.')
_SIZE = flags.DEFINE_integer('size', 224, 'Image side.')
_HALT = flags.DEFINE_enum('halt', 'never', ['never', 'first'],
                          'Halting override (see the module docstring).')
_TRAIN = flags.DEFINE_bool('train', False, 'Serve a training step '
                           '(CIFAR) instead of inference.')
_TAU = flags.DEFINE_float('tau', 0.01, 'With --train: the ponder cost\'s '
                          'weight.')
_THREADS = flags.DEFINE_integer(
    'threads', 2, 'Intra- and inter-op threads (1 for a server pinned to '
    'one core, lockstep.ShardedClient).')
_CIFAR_UNITS = {20: 3, 32: 5, 56: 9, 110: 18}


def _session(graph):
  """A session on `graph` with --threads threads, its variables initialised
  (the TF port's)."""
  # pylint: disable-next=g-import-not-at-top,import-outside-toplevel
  from tfcompat import tf
  with graph.as_default():
    init = [tf.global_variables_initializer(),
            tf.local_variables_initializer()]
  session = tf.Session(graph=graph, config=tf.ConfigProto(
      intra_op_parallelism_threads=_THREADS.value,
      inter_op_parallelism_threads=_THREADS.value))
  session.run(init)
  return session


def build(model_type: str, images_np):
  """One session and its logits tensor for `model_type` (port names)."""
  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from tfcompat import tf, slim
  import cifar_model
  import imagenet_model
  # pylint: enable=g-import-not-at-top,import-outside-toplevel
  graph = tf.Graph()
  with graph.as_default():
    tf.set_random_seed(0)
    images = tf.Variable(images_np, trainable=False, name='images',
                         collections=[tf.GraphKeys.LOCAL_VARIABLES])
    if _FAMILY.value == 'cifar':
      with slim.arg_scope(cifar_model.resnet_arg_scope(is_training=False)):
        logits, _ = cifar_model.resnet(
            images, model=[_CIFAR_UNITS[_DEPTH.value]], num_classes=10,
            model_type=model_type)
    else:
      with slim.arg_scope(imagenet_model.resnet_arg_scope(
          is_training=False)):
        logits, _ = imagenet_model.get_network(
            images, [_DEPTH.value], 1001, model_type=model_type)
    bias = -10.0 if _HALT.value == 'never' else 10.0
    overrides = []
    for v in tf.global_variables():
      if '/halting_proba/' not in v.op.name:
        continue
      if v.op.name.endswith('/weights'):
        overrides.append(tf.assign(v, tf.zeros_like(v)))
      elif v.op.name.endswith('/biases'):
        overrides.append(tf.assign(v, tf.fill(tf.shape(v), bias)))
  session = _session(graph)
  if overrides:
    session.run(overrides)
  return session, logits


def build_train_step(images_np, labels_np):
  """One session and its train op: a CIFAR training step as the original's
  cifar_main.py builds it (the learning rate constant at its first value,
  0.1)."""
  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from tfcompat import tf, slim
  import cifar_model
  import training_utils
  # pylint: enable=g-import-not-at-top,import-outside-toplevel
  graph = tf.Graph()
  with graph.as_default():
    tf.set_random_seed(0)
    local = [tf.GraphKeys.LOCAL_VARIABLES]
    images = tf.Variable(images_np, trainable=False, name='images',
                         collections=local)
    one_hot = tf.Variable(tf.one_hot(labels_np, 10), trainable=False,
                          name='labels', collections=local)
    with slim.arg_scope(cifar_model.resnet_arg_scope(is_training=True)):
      logits, end_points = cifar_model.resnet(
          images, model=[_CIFAR_UNITS[_DEPTH.value]], num_classes=10,
          model_type=_TYPE.value)
    tf.losses.softmax_cross_entropy(onehot_labels=one_hot, logits=logits)
    if _TYPE.value != 'vanilla':
      training_utils.add_all_ponder_costs(end_points, weights=_TAU.value)
    optimizer = tf.train.MomentumOptimizer(0.1, 0.9)
    tf.train.get_or_create_global_step()
    train_op = slim.learning.create_train_op(tf.losses.get_total_loss(),
                                             optimizer)
  return _session(graph), train_op


def main(argv):
  del argv
  if _FAMILY.value == 'cifar' and _DEPTH.value not in _CIFAR_UNITS:
    raise app.UsageError(f'CIFAR depth must be one of {sorted(_CIFAR_UNITS)}.')
  sys.path.insert(0, os.path.join(_TFREF.value, 'port'))
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images_np = rng.normal(size=(_BATCH.value, _SIZE.value, _SIZE.value,
                               3)).astype(np.float32)
  if _TRAIN.value:
    if _FAMILY.value != 'cifar':
      raise app.UsageError('--train takes the CIFAR family.')
    labels_np = rng.integers(0, 10, size=_BATCH.value)
    session, train_op = build_train_step(images_np, labels_np)
    lockstep.serve({'dense': functools.partial(session.run, train_op)},
                   {'impl': 'tf'})
    return
  types = {'dense': _TYPE.value}
  if _TYPE.value == 'act':
    types['sparse'] = 'act_early_stopping'
  calls = {}
  for name, model_type in types.items():
    session, logits = build(model_type, images_np)
    calls[name] = functools.partial(session.run, logits)
  lockstep.serve(calls, {'impl': 'tf'})


if __name__ == '__main__':
  app.run(main)
