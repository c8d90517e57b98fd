"""What the frozen-prefix feature cache trades, measured on this machine.

    python tools/cache_cost.py [--examples N]

Prints (1) the forward GFLOP/s of frozen conv blocks of typical shapes (inference
mode, batch 64) and (2) the GB/s at which the cache's stores give features back
through tf.data (in memory and on disk). Their ratio is the prefix FLOPs per
cached byte above which caching pays: kgreedy.training.cache.MIN_FLOPS_PER_BYTE.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kgreedy.model.layers import ConvBlock  # noqa: E402
from kgreedy.data.stores import Examples, PackedStore  # noqa: E402

CONVS = [(64, 3, 32), (32, 32, 64), (32, 128, 128), (16, 256, 256)]  # side, in, out


def conv_rate(side, cin, cout, batch=64, repeats=5):
    block = ConvBlock(cout)
    x = tf.random.normal([batch, side, side, cin])
    block.build(x.shape)
    step = tf.function(lambda x: block(x, training=False))
    step(x)
    start = time.perf_counter()
    for _ in range(repeats):
        step(x).numpy()
    seconds = (time.perf_counter() - start) / repeats
    return 2 * side * side * 9 * cin * cout * batch / seconds / 1e9


def read_rate(directory, side=32, channels=64, count=2000, batch=64):
    store = PackedStore(np.float32, channels, directory)
    store.extend(np.random.rand(count, side, side, channels).astype(np.float32))
    examples = Examples.from_store(store.finish(), np.zeros(count, np.int32))
    order = tf.data.Dataset.range(count).shuffle(count, seed=0)
    ds = examples.take(order).batch(batch).prefetch(tf.data.AUTOTUNE)
    for _ in ds.take(2):
        pass
    start = time.perf_counter()
    for _ in ds:
        pass
    seconds = time.perf_counter() - start
    store.remove()
    return count * side * side * channels * 4 / seconds / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python tools/cache_cost.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000,
                        help="32x32x64 feature maps read back per store (default 2000)")
    args = parser.parse_args(argv)
    rates = [conv_rate(*c) for c in CONVS]
    for (side, cin, cout), rate in zip(CONVS, rates):
        print(f"conv {cin}->{cout} at {side}x{side}: {rate:.1f} GFLOP/s")
    memory = read_rate(None, count=args.examples)
    with tempfile.TemporaryDirectory() as d:
        disk = read_rate(os.path.join(d, "store"), count=args.examples)
    print(f"feature read: memory {memory:.2f} GB/s, disk {disk:.2f} GB/s")
    best = max(rates)
    print(f"break-even prefix FLOPs per cached byte: memory {best / memory:.0f}, "
          f"disk {best / disk:.0f} (at the best conv rate)")
    return {"conv_gflops": rates, "memory_gbps": memory, "disk_gbps": disk}


if __name__ == "__main__":
    main()
