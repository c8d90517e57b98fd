"""Evaluating every head of a trained greedy net, and the paper's head ensemble.

After greedy training each head j still classifies from module j's output (the modules
below it never change again), so one pass through the trunk scores them all. The
paper (section 4) also reports the ensemble Z = sum_j 2^j z_j of the heads' outputs;
`kgreedy.model.network.ensemble_logits` computes it and `export.heads: "ensemble"` serves it.
"""

import numpy as np
import tensorflow as tf

from kgreedy.model.network import ensemble_logits


def head_predictions(net, dataset, stage=None):
    """Every example's answers from heads 1..stage and their ensemble, in one pass
    through the trunk.

    Args:
        net: a trained `GreedyNet`.
        dataset: batches of (raw images, labels), e.g. `Datasets.eval`.
        stage: the deepest head (default: the last).

    Returns:
        (confidences [n, stage]: each head's maximum softmax probability;
         classes [n, stage + 1]: each head's class, then the ensemble's;
         labels [n]), NumPy arrays in the dataset's order.
    """
    stage = stage or net.num_stages

    @tf.function
    def predictions(images):
        logits = [tf.cast(z, tf.float32) for z in net.all_head_logits(images, stage)]
        return (tf.stack([tf.reduce_max(tf.nn.softmax(z), axis=-1) for z in logits], 1),
                tf.stack([tf.argmax(z, axis=-1, output_type=tf.int32)
                          for z in logits + [ensemble_logits(logits)]], 1))

    confidences, classes, labels = [], [], []
    for images, batch_labels in dataset:
        confident, predicted = predictions(images)
        confidences.append(confident.numpy())
        classes.append(predicted.numpy())
        labels.append(np.asarray(batch_labels))
    if not labels:
        return (np.zeros((0, stage)), np.zeros((0, stage + 1), np.int32),
                np.zeros(0, np.int64))
    return np.concatenate(confidences), np.concatenate(classes), np.concatenate(labels)


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
    _, classes, labels = head_predictions(net, dataset, stage)
    accuracy = (classes == labels[:, None]).sum(axis=0) / max(len(labels), 1)
    return {"head_val_accuracies": [float(a) for a in accuracy[:-1]],
            "ensemble_val_accuracy": float(accuracy[-1]), "val_examples": len(labels)}
