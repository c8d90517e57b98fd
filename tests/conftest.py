"""Session set-up shared by all tests.

The CPU is split into two logical devices before TensorFlow runs its first op, so
MirroredStrategy tests can run in this process without GPUs (a split cannot be
made later). Code on the default strategy uses the first device only.
"""

import tensorflow as tf

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
