"""FLOPs per image of a layer, read from its traced graph."""

import tensorflow as tf


def graph_flops(layer, shape):
    """FLOPs of `layer` on one input of `shape` (no batch axis), from the Conv2D and
    MatMul ops of its traced graph (2*Hout*Wout*kh*kw*Cin*Cout, 2*m*k*n), whatever
    the layer; depthwise convolutions, BN, pooling and activations are left out."""
    fn = tf.function(lambda x: layer(x, training=False))
    graph = fn.get_concrete_function(tf.TensorSpec([1, *shape], tf.float32)).graph
    total = 0
    for op in graph.get_operations():
        if op.type == "Conv2D":
            kh, kw, cin, cout = op.inputs[1].shape
            out = op.outputs[0].shape
            h, w = (out[2], out[3]) if op.get_attr("data_format") == b"NCHW" else out[1:3]
            total += 2 * h * w * kh * kw * cin * cout
        elif op.type == "MatMul":
            a, b = op.inputs[0].shape, op.inputs[1].shape
            m, k = (a[1], a[0]) if op.get_attr("transpose_a") else (a[0], a[1])
            total += 2 * m * k * (b[0] if op.get_attr("transpose_b") else b[1])
    return total


def exit_flops(net, stage=None):
    """Per head j = 1..stage, the FLOPs per image of answering at head j: modules
    1..j and head j forward."""
    stage = stage or net.num_stages
    costs, prefix, shape = [], 0, net.image_shape
    for module, head, out in zip(net.modules[:stage], net.heads[:stage], net.stage_shapes):
        prefix += graph_flops(module, shape)
        costs.append(prefix + graph_flops(head, out))
        shape = out
    return costs
