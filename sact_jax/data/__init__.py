"""Input data: the generated datasets and grain pipelines.

Importing this package registers the `sact_shapes` and `sact_detection` tfds
builders.
"""

from sact_jax.data.detection import DETECTION_DATASETS
from sact_jax.data.detection import detection_info
from sact_jax.data.detection import DetectionInfo
from sact_jax.data.detection import make_detection_dataset
from sact_jax.data.detection_shapes import SactDetection
from sact_jax.data.pipeline import check_available
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
