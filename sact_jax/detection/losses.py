"""The two Faster R-CNN losses: RPN and box classifier, on sampled targets.

As the TF Object Detection API (the SACT paper's detector): each stage has a
classification term (objectness / class softmax) and a smooth-L1 (Huber,
delta 1) localisation term on the box codes of positive candidates, both
normalised by the number of sampled candidates of the image, so an image
with few positives does not weigh less; images are then averaged. Nothing
divides by a count that can be 0, so an image without objects gives finite
losses (its localisation terms are 0).
"""

import jax
import jax.numpy as jnp
import optax


def _normalised(values_BxN: jax.Array, selected_BxN: jax.Array,
                sampled_BxN: jax.Array) -> jax.Array:
  """Per image `sum(values[selected]) / max(#sampled, 1)`, images averaged."""
  total_B = jnp.sum(jnp.where(selected_BxN, values_BxN, 0.0), axis=1)
  count_B = jnp.sum(sampled_BxN.astype(jnp.float32), axis=1)
  return jnp.mean(total_B / jnp.maximum(count_B, 1.0))


def smooth_l1(codes_Nx4: jax.Array, targets_Nx4: jax.Array) -> jax.Array:
  """Huber loss with delta 1 summed over the 4 coordinates: `[N]`."""
  return jnp.sum(optax.huber_loss(codes_Nx4, targets_Nx4, delta=1.0), -1)


def rpn_loss(objectness_BxN: jax.Array, codes_BxNx4: jax.Array,
             target_codes_BxNx4: jax.Array, positive_BxN: jax.Array,
             sampled_BxN: jax.Array) -> dict[str, jax.Array]:
  """Objectness (sigmoid cross-entropy) and localisation losses of the RPN.

  Args:
    objectness_BxN: logits of "an object" per anchor.
    codes_BxNx4: predicted box codes per anchor.
    target_codes_BxNx4: codes of each anchor's matched box.
    positive_BxN: bool, the anchor is POSITIVE.
    sampled_BxN: bool, the anchor is in the minibatch.

  Returns:
    `{'rpn_objectness': scalar, 'rpn_localization': scalar}`.
  """
  ce = optax.sigmoid_binary_cross_entropy(objectness_BxN,
                                          positive_BxN.astype(jnp.float32))
  loc = smooth_l1(codes_BxNx4, target_codes_BxNx4)
  return {
      'rpn_objectness': _normalised(ce, sampled_BxN, sampled_BxN),
      'rpn_localization': _normalised(loc, sampled_BxN & positive_BxN,
                                      sampled_BxN),
  }


def box_classifier_loss(class_logits_BxRxK1: jax.Array,
                        codes_BxRxKx4: jax.Array, classes_BxR: jax.Array,
                        target_codes_BxRx4: jax.Array,
                        sampled_BxR: jax.Array) -> dict[str, jax.Array]:
  """Softmax classification and class-specific localisation losses.

  Args:
    class_logits_BxRxK1: logits over background (0) and the K classes.
    codes_BxRxKx4: box codes per region and class.
    classes_BxR: target class per region, 0 = background, k + 1 = class k.
    target_codes_BxRx4: codes of each region's matched box.
    sampled_BxR: bool, the region is in the minibatch (not padding).

  Returns:
    `{'box_classification': scalar, 'box_localization': scalar}`; only the
    codes of each positive region's own class are penalised.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(class_logits_BxRxK1,
                                                       classes_BxR)
  positive = (classes_BxR > 0) & sampled_BxR
  own_class = jnp.maximum(classes_BxR - 1, 0)
  own_codes_BxRx4 = jnp.take_along_axis(
      codes_BxRxKx4, own_class[..., None, None], axis=2)[:, :, 0]
  loc = smooth_l1(own_codes_BxRx4, target_codes_BxRx4)
  return {
      'box_classification': _normalised(ce, sampled_BxR, sampled_BxR),
      'box_localization': _normalised(loc, positive, sampled_BxR),
  }
