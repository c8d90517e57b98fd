"""kgreedy: greedy layer-wise training of CNNs in Keras 3 on TensorFlow.

After Belilovsky, Eickenberg & Oyallon, "Greedy Layerwise Learning Can Scale to
ImageNet" (ICML 2019). See README.md and DESIGN.md for the method and contracts.
"""

__version__ = "0.1.0"
