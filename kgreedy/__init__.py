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
