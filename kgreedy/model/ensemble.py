"""Evaluating every head of a trained greedy net, and the paper's head ensemble.

After greedy training each head j still classifies from module j's output (the modules
below it never change again), so one pass through the trunk scores them all. The
paper (section 4) also reports the ensemble Z = sum_j 2^j z_j of the heads' outputs;
`kgreedy.model.network.ensemble_logits` computes it and `export.heads: "ensemble"` serves it.
"""

import numpy as np
import tensorflow as tf

from kgreedy.model.network import ensemble_logits


def evaluate_heads(net, dataset, stage=None):
    """Accuracy of heads 1..stage and of their ensemble on `dataset`.

    Args:
        net: a trained `GreedyNet`.
        dataset: batches of (raw images, labels), e.g. `Datasets.eval`.
        stage: the deepest head (default: the last).

    Returns:
        {"head_val_accuracies": [acc of head 1, ...], "ensemble_val_accuracy": acc,
         "val_examples": n}.
    """
    stage = stage or net.num_stages

    @tf.function
    def predictions(images):
        logits = [tf.cast(z, tf.float32) for z in net.all_head_logits(images, stage)]
        return tf.stack([tf.argmax(z, axis=-1, output_type=tf.int32)
                         for z in logits + [ensemble_logits(logits)]])

    correct, count = np.zeros(stage + 1, np.int64), 0
    for images, labels in dataset:
        predicted = predictions(images).numpy()
        correct += (predicted == labels.numpy()[None, :]).sum(axis=1)
        count += len(labels)
    accuracy = correct / max(count, 1)
    return {"head_val_accuracies": [float(a) for a in accuracy[:-1]],
            "ensemble_val_accuracy": float(accuracy[-1]), "val_examples": count}
