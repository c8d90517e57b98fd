"""The inner loop: one stage's optimizer, step counter, traced step functions and
on-device metrics.

`StageLoop` knows one stage and nothing of epochs, stage order, files or the
terminal; `kgreedy.training.driver.EpochDriver` drives it epoch by epoch.
"""

import time

import keras
import tensorflow as tf

from kgreedy.training.optim import l2_penalty, make_optimizer, make_schedule


def _sum_variable(name, size=None):
    # ON_READ + SUM: each replica adds to its own copy without cross-device traffic
    # per step; reading outside the replica context returns the total.
    return tf.Variable(0.0 if size is None else tf.zeros([size]), trainable=False,
                       name=name,
                       synchronization=tf.VariableSynchronization.ON_READ,
                       aggregation=tf.VariableAggregation.SUM)


class StageLoop:
    """Trains stage `stage` of a `GreedyNet`: module `stage` and its head.

    A stage gets a fresh optimizer and freshly traced `tf.function`s: a traced
    function keeps the `trainable` flags it saw, and the optimizer's slots belong to
    this stage's variables only. Blocks 1..stage-1 run with `training=False` (BN in
    inference mode) and receive no gradient. In end-to-end mode every block up to
    `stage` trains, with the last head.

    Args:
        net: the `GreedyNet`.
        stage: 1-based stage index.
        train: the recipe's `TrainConfig`.
        strategy: a `tf.distribute.Strategy`; variables are created in its scope.
        steps_per_epoch: train steps per epoch (full global batches).
        end_to_end: train modules 1..stage jointly (the baseline).
        cached_features: the datasets yield the output of modules 1..stage-1 (the
            feature cache) instead of images.
        optimizer: called as `optimizer(stage)` in the strategy's scope, returns the
            stage's new Keras optimizer (`kgreedy.fit`); its own learning rate or
            schedule and weight decay then apply, and `train.optimizer`,
            `train.lr_schedule` and the L2 penalty are unused. Default: the recipe's.
    """

    def __init__(self, net, stage, train, strategy, steps_per_epoch, end_to_end=False,
                 cached_features=False, *, optimizer=None):
        self.net = net
        self.stage = stage
        self.train = train
        self.strategy = strategy
        self.steps_per_epoch = steps_per_epoch
        self.end_to_end = end_to_end
        self.cached_features = cached_features
        self.global_batch = train.batch_size
        self.loss_scaling = train.mixed_precision == "mixed_float16"
        with strategy.scope():
            self._build_training(optimizer)
            # Train and eval sums are apart: evaluating must not overwrite the sums of
            # an epoch in progress, which a mid-epoch checkpoint holds.
            self.train_sums = self._make_sums("train")
            self.eval_sums = self._make_sums("eval")
            # Train steps of this stage run so far: the stage's own counter. The
            # optimizer's `iterations` is not one: a loss-scaled step skipped for
            # overflow (mixed_float16) does not advance it, and the data position
            # and epoch must not lag behind the steps that ran.
            self.steps_done = tf.Variable(0, dtype=tf.int64, trainable=False,
                                          name=f"stage{stage}_step")
            # The stage step (1-based) whose loss was first not finite; 0 while all
            # are. Set from the all-reduced loss, so every replica and worker agrees.
            self.first_bad_step = tf.Variable(0, dtype=tf.int64, trainable=False,
                                              name=f"stage{stage}_first_bad_step")
        # XLA compiles the forward and backward pass only: the optimizer update and
        # the metric sums stay outside, where tf.distribute can all-reduce.
        self._gradients = tf.function(self._gradients_fn, jit_compile=True) \
            if train.jit_compile else self._gradients_fn
        self._train_steps = tf.function(self._train_steps_fn)
        self._evaluate = tf.function(self._evaluate_fn)

    def _build_training(self, optimizer):
        """Sets the trainable flags, `variables`, the optimizer and its schedule (in
        the strategy's scope)."""
        train, stage = self.train, self.stage
        self.net.set_trainable_stage(stage, self.end_to_end)
        prefix = self.net.modules[:stage - 1] if self.end_to_end else []
        self.variables = ([w for m in prefix for w in m.trainable_weights]
                          + self.net.stage_variables(stage))
        if optimizer is None:
            self.schedule = make_schedule(train, self.steps_per_epoch)
            self.optimizer = make_optimizer(train.optimizer, self.schedule)
            self.penalized = train.optimizer
        else:
            self.schedule = self.penalized = None
            self.optimizer = optimizer(stage)
        if self.loss_scaling:
            # float16 gradients underflow without it; dynamic scaling also skips
            # steps whose scaled gradients overflow.
            self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
        # Build the slots now, in scope, before the first traced step
        # (keras-team/keras#23085).
        self.optimizer.build(self.variables)

    def _make_sums(self, kind, size=None):
        """Loss, correct and count sums of train or eval steps: scalars, or one slot
        per module (`size`)."""
        return {k: _sum_variable(f"stage{self.stage}_{kind}_{k}", size)
                for k in ("loss", "correct", "count")}

    # ------------------------------------------------------------- traced ----

    def _logits(self, images, training):
        if self.cached_features:
            return self.net.stage_logits(images, self.stage, training)
        prefix_training = training and self.end_to_end
        features = self.net.features(images, self.stage - 1, training=prefix_training)
        return self.net.stage_logits(features, self.stage, training)

    @staticmethod
    def _accumulate(sums, labels, logits, per_example_loss, slot=None):
        """Adds a batch to the sums (to slot `slot` of per-module sums)."""
        correct = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels)
        for key, value in (("loss", tf.reduce_sum(per_example_loss)),
                           ("correct", tf.reduce_sum(tf.cast(correct, tf.float32))),
                           ("count", tf.cast(tf.size(labels), tf.float32))):
            if slot is not None:
                value = value * tf.one_hot(slot, sums[key].shape[0])
            sums[key].assign_add(value)

    def _loss_gradients(self, forward, variables, optimizer):
        """Runs `forward()` (logits, the objective's per-example losses, anything
        else) under a tape; returns the gradients of the mean `total` loss for
        `variables`, that loss, the logits, the head's per-example cross-entropy (what
        the metric sums add up) and the rest of what `forward` returned."""
        with tf.GradientTape() as tape:
            logits, losses, rest = forward()
            per_example = losses["cross_entropy"]
            # Averaged over the global batch (per-replica batch x replicas: the
            # recipe's batch, whose pipelines drop partial batches), so summing
            # gradients over replicas gives the mean gradient whatever the replica
            # count; a partial last batch of a user's pipeline (kgreedy.fit) is
            # averaged over its own examples, as Keras' fit does.
            loss = tf.nn.compute_average_loss(losses["total"])
            penalty = (None if self.penalized is None
                       else l2_penalty(self.penalized, variables))
            if penalty is not None:
                loss += tf.nn.scale_regularization_loss(penalty)
            scaled = optimizer.scale_loss(loss) if self.loss_scaling else loss
        return tape.gradient(scaled, variables), loss, logits, per_example, rest

    def _gradients_fn(self, images, labels):
        def forward():
            if self.cached_features:  # the objective needs no images (validated)
                features, images_ = images, None
            else:
                features = self.net.features(images, self.stage - 1,
                                             training=self.end_to_end)
                images_ = images
            logits, losses, _ = self.net.module_losses(self.stage, features, labels,
                                                       images_, training=True)
            return logits, losses, None

        grads, loss, logits, per_example, _ = self._loss_gradients(
            forward, self.variables, self.optimizer)
        return grads, loss, logits, per_example

    def _train_step(self, images, labels):
        grads, loss, logits, per_example = self._gradients(images, labels)
        self.optimizer.apply_gradients(zip(grads, self.variables))
        self._accumulate(self.train_sums, labels, logits, per_example)
        return loss

    def _train_steps_fn(self, iterator, num_steps):
        for _ in tf.range(num_steps):
            images, labels = next(iterator)
            losses = self.strategy.run(self._train_step, args=(images, labels))
            loss = self.strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)
            step = self.steps_done.assign_add(1)
            bad = tf.logical_and(self.first_bad_step == 0,
                                 tf.logical_not(tf.math.is_finite(loss)))
            self.first_bad_step.assign(tf.where(bad, step, self.first_bad_step))

    def _eval_step(self, images, labels):
        def evaluate():
            logits = self._logits(images, training=False)
            per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels, tf.cast(logits, tf.float32))
            self._accumulate(self.eval_sums, labels, logits, per_example)
            return tf.constant(True)

        # When the last eval batch does not fill every replica, the others get an
        # empty batch; TF 2.21's CPU conv returns a wrongly shaped result for a
        # batch of 0, so such a batch is skipped (it adds nothing to the sums).
        tf.cond(tf.size(labels) > 0, evaluate, lambda: tf.constant(False))

    def _evaluate_fn(self, dataset):
        for images, labels in dataset:
            self.strategy.run(self._eval_step, args=(images, labels))

    # --------------------------------------------------------------- host ----

    @staticmethod
    def _read(sums):
        """(mean loss, accuracy) of scalar sums; of per-module sums, two lists."""
        # Reading syncs with the device (and, across workers, is a collective every
        # worker must join), so callers read only when someone looks.
        loss, correct, count = (sums[k].read_value().numpy()
                                for k in ("loss", "correct", "count"))
        if count.ndim == 0:
            count = max(float(count), 1.0)
            return float(loss) / count, float(correct) / count
        count = [max(float(c), 1.0) for c in count]
        return ([float(v) / c for v, c in zip(loss, count)],
                [float(v) / c for v, c in zip(correct, count)])

    def metrics(self):
        """(mean loss, accuracy) over the train steps of the epoch so far."""
        return self._read(self.train_sums)

    def module_metrics(self):
        """Per module (mean losses, accuracies) of the epoch so far; None when the
        loop trains one head."""
        return None

    @property
    def step(self):
        """Train steps of this stage done so far (the stage's own counter)."""
        return int(self.steps_done.numpy())

    def start_at(self, step):
        """Positions a fresh loop at `step` of its stage: the counter, and the
        learning-rate schedule with it (a continued trial goes on where it stopped)."""
        self.steps_done.assign(step)
        self.optimizer.iterations.assign(step)

    @property
    def learning_rate(self):
        """The rate the next step will use."""
        if self.schedule is None:  # a caller's optimizer: its rate or schedule
            return float(self.optimizer.learning_rate)
        return float(self.schedule(self.optimizer.iterations))

    def learning_rate_at(self, step):
        """The recipe's rate at stage step `step` (0-based); a caller's optimizer's
        rate now, which only it knows."""
        if self.schedule is None:
            return self.learning_rate
        return float(self.schedule(step))

    def state(self):
        """What a checkpoint must hold to continue this stage mid-epoch."""
        return {"optimizer": self.optimizer, "step": self.steps_done,
                "first_bad_step": self.first_bad_step,
                **{f"train_{k}": v for k, v in self.train_sums.items()}}

    def train_epoch(self, dataset, start_step=0, after_chunk=None, align=None):
        """Runs the steps of one epoch from `start_step` over a distributed dataset.

        The steps run in chunks of `train.steps_per_execution` traced steps.

        Args:
            dataset: a distributed train dataset of full global batches, already
                positioned at `start_step`.
            start_step: steps of this epoch done before (a mid-epoch resume); the
                metric sums are kept then, so the epoch's figures cover all its steps.
            after_chunk: called as `after_chunk(done, images_per_s)` after every
                chunk (progress, mid-epoch checkpoints, preemption).
            align: chunks end at multiples of this many steps (checkpoint steps).

        Returns:
            dict with train_loss, train_accuracy, images_per_second and seconds.
        """
        if start_step == 0:
            for v in self.train_sums.values():
                v.assign(tf.zeros_like(v))
        iterator = iter(dataset)
        chunk = self.train.steps_per_execution
        start = time.perf_counter()
        done = start_step
        while done < self.steps_per_epoch:
            n = min(chunk, self.steps_per_epoch - done)
            if align:
                n = min(n, align - done % align)
            self._train_steps(iterator, tf.constant(n))
            done += n
            if after_chunk is not None:
                after_chunk(done, (done - start_step) * self.global_batch
                            / max(time.perf_counter() - start, 1e-9))
        loss, acc = self.metrics()  # also waits for the last step to finish
        seconds = time.perf_counter() - start
        return {"train_loss": loss, "train_accuracy": acc,
                "images_per_second": (done - start_step) * self.global_batch / seconds,
                "seconds": seconds, **self._per_module("train", self.train_sums)}

    def _per_module(self, kind, sums):
        """`{kind}_module_loss` and `_accuracy` lists for a record; {} here."""
        del kind, sums
        return {}

    def evaluate(self, dataset):
        """Loss and accuracy of this stage's head over a distributed eval dataset."""
        for v in self.eval_sums.values():
            v.assign(tf.zeros_like(v))
        self._evaluate(dataset)
        loss, acc = self._read(self.eval_sums)
        if isinstance(loss, list):  # per module: the last head is the model's
            loss, acc = loss[-1], acc[-1]
        return {"val_loss": loss, "val_accuracy": acc,
                "val_examples": int(tf.reduce_max(self.eval_sums["count"].read_value())),
                **self._per_module("val", self.eval_sums)}
