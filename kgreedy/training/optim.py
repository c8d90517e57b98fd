"""Optimizers and per-stage learning-rate schedules, built fresh for every stage."""

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="kgreedy")
class StageSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate as a function of the step within one stage.

    Args:
        learning_rate: the initial rate.
        steps_per_epoch: steps in one epoch of the stage.
        epochs: epochs in the stage (cosine decays to its end).
        kind: `constant`, `step` (x decay_factor every decay_every_epochs, as in the
            paper) or `cosine`.
        decay_every_epochs: step decay period.
        decay_factor: step decay multiplier.
        warmup_epochs: linear warm-up from lr/warmup_steps to lr.
        final_fraction: cosine: final rate as a fraction of the initial one.
    """

    def __init__(self, learning_rate, steps_per_epoch, epochs, kind="step",
                 decay_every_epochs=15, decay_factor=0.2, warmup_epochs=0,
                 final_fraction=0.0):
        self.learning_rate = learning_rate
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.kind = kind
        self.decay_every_epochs = decay_every_epochs
        self.decay_factor = decay_factor
        self.warmup_epochs = warmup_epochs
        self.final_fraction = final_fraction

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        lr = tf.constant(self.learning_rate, tf.float32)
        warmup = float(self.warmup_epochs * self.steps_per_epoch)
        if self.kind == "step":
            period = float(self.decay_every_epochs * self.steps_per_epoch)
            lr = lr * tf.pow(self.decay_factor, tf.floor(step / period))
        elif self.kind == "cosine":
            total = max(float(self.epochs * self.steps_per_epoch) - warmup, 1.0)
            progress = tf.clip_by_value((step - warmup) / total, 0.0, 1.0)
            ff = self.final_fraction
            lr = lr * (ff + (1.0 - ff) * 0.5 * (1.0 + tf.cos(math.pi * progress)))
        if warmup > 0:
            lr = lr * tf.minimum(1.0, (step + 1.0) / warmup)
        return lr

    def get_config(self):
        return {"learning_rate": self.learning_rate, "steps_per_epoch": self.steps_per_epoch,
                "epochs": self.epochs, "kind": self.kind,
                "decay_every_epochs": self.decay_every_epochs,
                "decay_factor": self.decay_factor, "warmup_epochs": self.warmup_epochs,
                "final_fraction": self.final_fraction}


def make_schedule(train, steps_per_epoch, epochs=None):
    """The recipe's `train.lr_schedule` for one stage."""
    s = train.lr_schedule
    return StageSchedule(train.optimizer.learning_rate, steps_per_epoch,
                         epochs or train.epochs_per_stage, s.name, s.decay_every_epochs,
                         s.decay_factor, s.warmup_epochs, s.final_fraction)


def make_optimizer(config, schedule):
    """A new Keras optimizer from `train.optimizer`.

    With `weight_decay_type: l2` the decay is not given to Keras (whose
    `weight_decay` is decoupled); the engine adds it to the loss, so it goes through
    momentum as in PyTorch's SGD and the paper's code.
    """
    decoupled = config.weight_decay if config.weight_decay_type == "decoupled" else None
    decoupled = decoupled or None  # Keras treats 0.0 as "apply a zero decay"
    if config.name == "sgd":
        return keras.optimizers.SGD(schedule, momentum=config.momentum,
                                    nesterov=config.nesterov, weight_decay=decoupled)
    return keras.optimizers.AdamW(schedule, beta_1=config.beta_1, beta_2=config.beta_2,
                                  weight_decay=decoupled or 0.0)


def l2_penalty(config, variables):
    """0.5 * wd * sum(w^2) for coupled (`l2`) decay, else None."""
    if config.weight_decay_type != "l2" or not config.weight_decay:
        return None
    return 0.5 * config.weight_decay * tf.add_n([tf.reduce_sum(tf.square(v))
                                                 for v in variables])
