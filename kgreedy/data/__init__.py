"""The data room: image decoding, folders, stores and the tf.data pipelines.

The public names below are what the rest of kgreedy uses (`from kgreedy import data`);
the submodules hold the details.
"""

from kgreedy.data.datasets import Datasets, load
from kgreedy.data.spec import (DatasetSpec, describe, load_spec, save_spec,
                               tfds_split_names)
from kgreedy.data.transforms import decode_image, eval_transform

__all__ = ["Datasets", "DatasetSpec", "decode_image", "describe", "eval_transform",
           "load", "load_spec", "save_spec", "tfds_split_names"]
