"""Input pipelines (tf.data on the host): sources, augmentations, sharding and global arrays.

See `swin_ssl/data/pipeline.py` for the config fields, determinism/resume and broken-file handling.
Attributes load lazily so that `swin_ssl.data.fashion_mnist` (and its CLI) does not import TensorFlow.
"""
import importlib

_EXPORTS = {
    "ViewSpec": "augment", "eval_view": "augment", "make_views": "augment",
    "EvalIterable": "pipeline", "TrainIterator": "pipeline", "default_config": "defaults",
    "global_batches": "pipeline", "make_eval_iterator": "pipeline", "make_train_iterator": "pipeline",
    "to_global_arrays": "pipeline", "view_specs": "pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"swin_ssl.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'swin_ssl.data' has no attribute {name!r}")
