"""Input data: the generated `sact_shapes` dataset and grain pipelines.

Importing this package registers the `sact_shapes` tfds builder.
"""

from sact_jax.data.pipeline import dataset_info
from sact_jax.data.pipeline import DatasetInfo
from sact_jax.data.pipeline import DatasetNotFoundError
from sact_jax.data.pipeline import get_iterator_state
from sact_jax.data.pipeline import image_shape
from sact_jax.data.pipeline import label_offset
from sact_jax.data.pipeline import make_dataset
from sact_jax.data.pipeline import preprocess_image
from sact_jax.data.pipeline import set_iterator_state
from sact_jax.data.pipeline import SUPPORTED_DATASETS
from sact_jax.data.shapes import CLASS_NAMES
from sact_jax.data.shapes import generate_examples
from sact_jax.data.shapes import SactShapes
