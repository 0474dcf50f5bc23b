"""ResNet families of the reference, in vanilla, ACT and SACT variants."""

from sact_jax.models.cifar import CIFAR_PRESETS
from sact_jax.models.cifar import CifarResNet
from sact_jax.models.factory import create_model
from sact_jax.models.factory import depth_or_units
from sact_jax.models.factory import FAMILIES
from sact_jax.models.factory import is_integer
from sact_jax.models.factory import positive_int
from sact_jax.models.factory import resnet_depth
from sact_jax.models.factory import resolve_units
from sact_jax.models.imagenet import IMAGENET_PRESETS
from sact_jax.models.imagenet import ImageNetResNet
from sact_jax.models.spec import ModelSpec
