"""kgreedy: greedy layer-wise training of CNNs in Keras 3 on TensorFlow.

After Belilovsky, Eickenberg & Oyallon, "Greedy Layerwise Learning Can Scale to
ImageNet" (ICML 2019). See README.md, and docs/DESIGN.md for the architecture and
contracts.
"""

__version__ = "0.1.0"

import os as _os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) buries kgreedy's own
# progress lines; a user who wants it sets TF_CPP_MIN_LOG_LEVEL themselves.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The Python API (docs/python-api.md), loaded on first use: `import kgreedy` stays
# free of TensorFlow, so the command lines can filter its start-up lines before it
# loads (kgreedy.quiet). importlib keeps the import lazy, and out of the package's
# import graph (tests/project/test_layering.py): only the names below reach it.
_LAZY = {"split": "kgreedy.api", "fit": "kgreedy.api", "SplitNet": "kgreedy.api",
         "heads": "kgreedy.heads"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'kgreedy' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"kgreedy.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])
