"""Image sources and the grain input pipeline.

  from jigsaw_jax import data
  config = data.default_config()              # config.data: .source and .pipeline
  source = data.make_image_source(config.source)
  image = source[7]                           # uint8 [H, W, 3], the same on every call
  it = iter(data.make_dataset(config))        # batches of GRPO groups
  batch = next(it); state = it.get_state()    # JSON-able; it.set_state(state) resumes exactly

Sources: `bundled` (crops of the photos shipped in scikit-image/scikit-learn/matplotlib, the
default), `procedural`, `folder` (JPEG/PNG trees such as COCO; its test split a second folder or
a local Hugging Face export of jigsaw-r1/coco) and `tfds`. Config fields are
documented in `jigsaw_jax.data.config`.
"""

from jigsaw_jax.data.bundled import BundledSource
from jigsaw_jax.data.config import default_config, pipeline_config, source_config
from jigsaw_jax.data.curriculum import Curriculum, Stage
from jigsaw_jax.data.folder import FolderSource
from jigsaw_jax.data.images import ImageSource
from jigsaw_jax.data.pipeline import collate_groups, image_index, make_dataset
from jigsaw_jax.data.procedural import ProceduralSource
from jigsaw_jax.data.sources import KINDS, make_image_source

__all__ = [
    "BundledSource", "Curriculum", "FolderSource", "HfDatasetSource", "ImageSource", "KINDS",
    "ProceduralSource",
    "Stage", "TfdsSource", "collate_groups", "default_config", "image_index", "make_dataset",
    "make_image_source", "pipeline_config", "source_config",
]


def __getattr__(name):
  # TfdsSource imports tensorflow_datasets; load it only when asked for.
  if name == "TfdsSource":
    from jigsaw_jax.data.tfds_source import TfdsSource  # pylint: disable=g-import-not-at-top
    return TfdsSource
  # HfDatasetSource imports the `datasets` library; the same.
  if name == "HfDatasetSource":
    from jigsaw_jax.data.hf_dataset import HfDatasetSource  # pylint: disable=g-import-not-at-top
    return HfDatasetSource
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
