"""The inner loop: one stage's optimizer, traced step functions and on-device metrics.

`StageLoop` knows one stage and nothing of stage order, files or the terminal; the
controller in `kgreedy.greedy` drives it epoch by epoch.
"""

import time

import tensorflow as tf

from kgreedy.optim import l2_penalty, make_optimizer, make_schedule


def _sum_variable(name):
    # ON_READ + SUM: each replica adds to its own copy without cross-device traffic
    # per step; reading outside the replica context returns the total.
    return tf.Variable(0.0, trainable=False, name=name,
                       synchronization=tf.VariableSynchronization.ON_READ,
                       aggregation=tf.VariableAggregation.SUM)


class StageLoop:
    """Trains stage `stage` of a `GreedyNet`: block `stage` and its head.

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
        end_to_end: train blocks 1..stage jointly (the baseline).
    """

    def __init__(self, net, stage, train, strategy, steps_per_epoch, end_to_end=False):
        self.net = net
        self.stage = stage
        self.train = train
        self.strategy = strategy
        self.steps_per_epoch = steps_per_epoch
        self.end_to_end = end_to_end
        self.global_batch = train.batch_size
        with strategy.scope():
            net.set_trainable_stage(stage, end_to_end)
            blocks = net.blocks[:stage] if end_to_end else [net.blocks[stage - 1]]
            self.variables = ([w for b in blocks for w in b.trainable_weights]
                              + net.heads[stage - 1].trainable_weights)
            self.schedule = make_schedule(train, steps_per_epoch)
            self.optimizer = make_optimizer(train.optimizer, self.schedule)
            # Build the slots now, in scope, before the first traced step
            # (keras-team/keras#23085).
            self.optimizer.build(self.variables)
            self._sums = {k: _sum_variable(f"stage{stage}_{k}")
                          for k in ("loss", "correct", "count")}
        self._train_steps = tf.function(self._train_steps_fn)
        self._evaluate = tf.function(self._evaluate_fn)

    # ------------------------------------------------------------- traced ----

    def _logits(self, images, training):
        prefix_training = training and self.end_to_end
        features = self.net.features(images, self.stage - 1, training=prefix_training)
        return self.net.stage_logits(features, self.stage, training)

    def _accumulate(self, labels, logits, per_example_loss):
        correct = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels)
        self._sums["loss"].assign_add(tf.reduce_sum(per_example_loss))
        self._sums["correct"].assign_add(tf.reduce_sum(tf.cast(correct, tf.float32)))
        self._sums["count"].assign_add(tf.cast(tf.size(labels), tf.float32))

    def _train_step(self, images, labels):
        with tf.GradientTape() as tape:
            logits = self._logits(images, training=True)
            per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels, tf.cast(logits, tf.float32))
            # Averaged over the global batch, so summing gradients over replicas gives
            # the mean gradient whatever the replica count.
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch)
            penalty = l2_penalty(self.train.optimizer, self.variables)
            if penalty is not None:
                loss += tf.nn.scale_regularization_loss(penalty)
        grads = tape.gradient(loss, self.variables)
        self.optimizer.apply_gradients(zip(grads, self.variables))
        self._accumulate(labels, logits, per_example)

    def _train_steps_fn(self, iterator, num_steps):
        for _ in tf.range(num_steps):
            images, labels = next(iterator)
            self.strategy.run(self._train_step, args=(images, labels))

    def _eval_step(self, images, labels):
        logits = self._logits(images, training=False)
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels, tf.cast(logits, tf.float32))
        self._accumulate(labels, logits, per_example)

    def _evaluate_fn(self, dataset):
        for images, labels in dataset:
            self.strategy.run(self._eval_step, args=(images, labels))

    # --------------------------------------------------------------- host ----

    def _reset(self):
        for v in self._sums.values():
            v.assign(0.0)

    def _read(self):
        count = max(float(self._sums["count"].read_value()), 1.0)
        return (float(self._sums["loss"].read_value()) / count,
                float(self._sums["correct"].read_value()) / count)

    @property
    def learning_rate(self):
        """The rate the next step will use."""
        return float(self.schedule(self.optimizer.iterations))

    def train_epoch(self, dataset, on_progress=None, progress_every=0.5):
        """Runs one epoch of `steps_per_epoch` steps over a distributed dataset.

        Args:
            dataset: a distributed train dataset of full global batches.
            on_progress: called as `on_progress(step, loss, accuracy, images_per_s)`
                at most every `progress_every` seconds (reading the metrics syncs
                with the device, so it is only done when someone looks).
            progress_every: seconds between progress calls.

        Returns:
            dict with train_loss, train_accuracy, images_per_second, seconds.
        """
        self._reset()
        iterator = iter(dataset)
        chunk = self.train.steps_per_execution
        start = last = time.perf_counter()
        done = 0
        while done < self.steps_per_epoch:
            n = min(chunk, self.steps_per_epoch - done)
            self._train_steps(iterator, tf.constant(n))
            done += n
            now = time.perf_counter()
            if on_progress is not None and now - last >= progress_every:
                loss, acc = self._read()
                on_progress(done, loss, acc, done * self.global_batch / (now - start))
                last = now
        loss, acc = self._read()  # also waits for the last step to finish
        seconds = time.perf_counter() - start
        return {"train_loss": loss, "train_accuracy": acc,
                "images_per_second": done * self.global_batch / seconds,
                "seconds": seconds}

    def evaluate(self, dataset):
        """Loss and accuracy of this stage's head over a distributed eval dataset."""
        self._reset()
        self._evaluate(dataset)
        loss, acc = self._read()
        return {"val_loss": loss, "val_accuracy": acc,
                "val_examples": int(self._sums["count"].read_value())}

