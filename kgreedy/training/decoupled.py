"""Decoupled greedy training (DGL, Belilovsky, Eickenberg & Oyallon, ICML 2020):
every module trains at once, each on its own head's loss.

`DecoupledLoop` is a `StageLoop` over every module: one step runs the batch through
modules 1..J; module j's loss is head j's loss on module j's output, its input is
cut from the gradient, and module j and head j have an optimizer of their own (the
recipe's, with its schedule), all updated in the same step. No gradient crosses a
module boundary, so module j's backward pass needs nothing of module j+1: the step
finishes module j's update before module j+1's forward pass starts, and module j's
activations are freed then (what makes a decoupled step lighter than end to end).

With `train.decoupled.buffer_size` > 0 (DGL section 3.2), module j+1 trains on a
batch drawn from a replay buffer of module j's recent outputs and their labels
instead of module j's output on the current batch (`ReplayBuffer`).
"""

import keras
import tensorflow as tf

from kgreedy.training.optim import make_optimizer, make_schedule
from kgreedy.training.stage import StageLoop


class DecoupledLoop(StageLoop):
    """Trains every module of a `GreedyNet` at once, each with its own head.

    It is the single "stage" of a decoupled run (stage J, holding every module and
    head); the `EpochDriver`, checkpoints and records drive it as any stage. Its
    records carry per-module figures: `train_module_loss`, `train_module_accuracy`,
    `val_module_loss` and `val_module_accuracy`, lists in module order; the
    `train_*`/`val_*` scalars are the last head's.

    Args:
        net: the `GreedyNet`.
        train: the recipe's `TrainConfig` (`train.decoupled` for the buffer).
        strategy: a `tf.distribute.Strategy`; variables are created in its scope.
        steps_per_epoch: train steps per epoch (full global batches).
        optimizer: called as `optimizer(j)` for every module j in the strategy's
            scope, returns module j's Keras optimizer (`kgreedy.fit`); default: the
            recipe's, one per module.
        seed: seeds the replay buffers' draws.
    """

    def __init__(self, net, train, strategy, steps_per_epoch, *, optimizer=None, seed=0):
        self.seed = seed
        super().__init__(net, net.num_stages, train, strategy, steps_per_epoch,
                         optimizer=optimizer)
        self._gradients = [self._module_gradients(j) for j in range(net.num_stages)]

    def _build_training(self, optimizer):
        net, train = self.net, self.train
        for layer in (*net.modules, *net.heads,
                      *(part for parts in net.parts for part in parts.values())):
            layer.trainable = True
        self.module_variables = [net.stage_variables(j)
                                 for j in range(1, net.num_stages + 1)]
        self.variables = [w for ws in self.module_variables for w in ws]
        if optimizer is None:
            self.schedule = make_schedule(train, self.steps_per_epoch)
            self.optimizers = [make_optimizer(train.optimizer, self.schedule)
                               for _ in net.modules]
            self.penalized = train.optimizer
        else:
            self.schedule = self.penalized = None
            self.optimizers = [optimizer(j) for j in range(1, net.num_stages + 1)]
        if self.loss_scaling:
            self.optimizers = [keras.optimizers.LossScaleOptimizer(o)
                               for o in self.optimizers]
        for opt, variables in zip(self.optimizers, self.module_variables):
            opt.build(variables)  # in scope, before the first traced step (#23085)
        self.optimizer = self.optimizers[-1]
        size = train.decoupled.buffer_size
        # Objectives that rebuild the image keep each output's image in the buffer too.
        image_shape = net.image_shape if net.objective.needs_images else None
        self.buffers = [ReplayBuffer(size, shape, j, self.seed, self.stage, image_shape)
                        for j, shape in enumerate(net.stage_shapes[:-1], start=1)] \
            if size else []

    def _make_sums(self, kind, size=None):
        return super()._make_sums(kind, size or self.net.num_stages)

    # ------------------------------------------------------------- traced ----

    def _module_gradients(self, j):
        """Module j+1's (0-based j) loss and gradients on its input, traced apart
        (and XLA-compiled with `train.jit_compile`)."""
        def gradients(features, labels, images):
            def forward():
                return self.net.module_losses(j + 1, features, labels, images,
                                              training=True)
            return self._loss_gradients(forward, self.module_variables[j],
                                        self.optimizers[j])

        return tf.function(gradients, jit_compile=True) if self.train.jit_compile \
            else gradients

    def _train_step(self, images, labels):
        # Module j's input is a plain tensor outside module j's tape: nothing flows
        # back into module j-1. stop_gradient says so to any outer tape as well.
        x, total = tf.stop_gradient(self.net.standardize(images)), 0.0
        step = self.steps_done + 1  # this step, 1-based: the replay buffers' draws
        for j, variables in enumerate(self.module_variables):
            grads, loss, logits, per_example, output = self._gradients[j](x, labels, images)
            self.optimizers[j].apply_gradients(zip(grads, variables))
            self._accumulate(self.train_sums, labels, logits, per_example, slot=j)
            total += loss
            if j + 1 == len(self.module_variables):
                break
            # Module j+1 starts once module j's gradients exist, so module j's
            # activations are freed before module j+1's are made: without the
            # dependency the executor may run every forward pass first.
            with tf.control_dependencies([g for g in grads if g is not None]):
                x = tf.stop_gradient(tf.identity(output))
            if self.buffers:
                x, labels, images = self.buffers[j].push_and_draw(x, labels, step, images)
        return total

    def _eval_step(self, images, labels):
        def evaluate():
            for j, logits in enumerate(self.net.all_head_logits(images)):
                per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels, tf.cast(logits, tf.float32))
                self._accumulate(self.eval_sums, labels, logits, per_example, slot=j)
            return tf.constant(True)

        tf.cond(tf.size(labels) > 0, evaluate, lambda: tf.constant(False))

    # --------------------------------------------------------------- host ----

    def metrics(self):
        """The last head's (mean loss, accuracy) over the epoch so far."""
        loss, acc = self._read(self.train_sums)
        return loss[-1], acc[-1]

    def module_metrics(self):
        """Per module: (mean losses, accuracies) over the epoch so far."""
        return self._read(self.train_sums)

    def _per_module(self, kind, sums):
        loss, acc = self._read(sums)
        return {f"{kind}_module_loss": loss, f"{kind}_module_accuracy": acc}

    def start_at(self, step):
        self.steps_done.assign(step)
        for opt in self.optimizers:
            opt.iterations.assign(step)

    def state(self):
        state = super().state()
        # Every module's optimizer, and the buffers: a resume continues with the
        # same stale outputs the run would have drawn.
        del state["optimizer"]
        state["optimizers"] = self.optimizers
        if self.buffers:
            state["buffers"] = self.buffers
        return state


def buffer_dtype(policy):
    """The dtype a replay buffer stores module outputs in, under a Keras policy name
    (or a recipe's `train.mixed_precision`): float16 under mixed_float16, else float32.

    bfloat16 outputs are stored as float32 (exactly): MultiWorkerMirroredStrategy
    broadcasts every variable's initial value with CollectiveBcastSend, which carries
    no bfloat16. `memory.replay_buffer_bytes` counts with this too.
    """
    return tf.float16 if policy == "mixed_float16" else tf.float32


class ReplayBuffer(tf.Module):
    """A ring of module j's recent outputs with their labels (DGL section 3.2).

    Each step writes the global batch of module j's outputs (gathered from every
    replica, so each replica holds the same buffer, as one device would) over the
    oldest entries, then draws module j+1's batch uniformly, with replacement, from
    the entries written so far (the current batch included). The draw is a function
    of (seed, module, step): a resumed run draws what the unbroken one would have.

    Args:
        size: entries (examples) it holds; at least the global batch.
        shape: (height, width, channels) of module j's output.
        module: j, 1-based.
        seed: the run's seed.
        stage: the stage it belongs to (variable names).
        image_shape: (H, W, C) of the input images, to keep each output's image with
            it (for an objective that rebuilds the image); None keeps none.
    """

    def __init__(self, size, shape, module, seed, stage, image_shape=None):
        super().__init__(name=f"module{module}_buffer")
        self.size = size
        self.module = module
        self.seed = seed
        # Each replica keeps its own copy (ON_READ: writes need no cross-replica
        # traffic) and writes the same gathered batch into it, so every copy holds the
        # same values; a checkpoint saves the first replica's and restores it to all.
        kwargs = {"trainable": False,
                  "synchronization": tf.VariableSynchronization.ON_READ,
                  "aggregation": tf.VariableAggregation.ONLY_FIRST_REPLICA}
        dtype = buffer_dtype(keras.mixed_precision.global_policy().name)
        self.features = tf.Variable(tf.zeros([size, *shape], dtype),
                                    name=f"stage{stage}_module{module}_buffer", **kwargs)
        self.labels = tf.Variable(tf.zeros([size], tf.int32),
                                  name=f"stage{stage}_module{module}_labels", **kwargs)
        # Raw pixels in float32 (exact for 8-bit images).
        self.images = None if image_shape is None else tf.Variable(
            tf.zeros([size, *image_shape], tf.float32),
            name=f"stage{stage}_module{module}_images", **kwargs)
        # Examples written so far: the next write position and how much is filled.
        self.written = tf.Variable(tf.constant(0, tf.int64),
                                   name=f"stage{stage}_module{module}_written", **kwargs)

    def push_and_draw(self, features, labels, step, images=None):
        """Writes this replica's `features`, `labels` (and `images`, where the buffer
        keeps them), gathered over replicas; returns a replica batch of the same size
        drawn from the buffer: (features, labels, images or None)."""
        context = tf.distribute.get_replica_context()
        local = tf.shape(labels, out_type=tf.int64)[0]
        every_features = tf.cast(_gather(context, features), self.features.dtype)
        every_labels = tf.cast(_gather(context, labels), tf.int32)
        count = tf.shape(every_labels, out_type=tf.int64)[0]
        positions = (self.written + tf.range(count, dtype=tf.int64)) % self.size
        # ON_READ variables have no scatter_update; in a replica, `handle` is this
        # replica's own copy, written in place (assigning the whole ring would copy
        # it every step).
        rings = [(self.features, every_features), (self.labels, every_labels)]
        if self.images is not None:
            rings.append((self.images, _gather(context, images)))
        for ring, rows in rings:
            tf.raw_ops.ResourceScatterUpdate(resource=ring.handle, indices=positions,
                                             updates=rows)
        written = self.written.assign_add(count)
        filled = tf.minimum(written, self.size)
        draw = tf.random.stateless_uniform(
            [count], seed=tf.stack([tf.cast(self.seed, tf.int64) * 1000 + self.module, step]),
            minval=0, maxval=filled, dtype=tf.int64)
        # Each replica takes its own slice of the one global draw.
        first = tf.cast(context.replica_id_in_sync_group, tf.int64) * local
        mine = draw[first:first + local]
        drawn_images = None if self.images is None else tf.cast(
            tf.gather(self.images, mine), images.dtype)
        return (tf.cast(tf.gather(self.features, mine), features.dtype),
                tf.gather(self.labels, mine), drawn_images)


def _gather(context, value):
    """Every replica's `value` (same shape on each) stacked in replica order, in
    float32 (exact for labels and for bfloat16 or float16 features).

    A sum of zero-padded copies rather than `ReplicaContext.all_gather`, which fails
    under MultiWorkerMirroredStrategy in TF 2.21 ("destinations can not be empty");
    every strategy supports an all-reduce, and adding zeros is exact.
    """
    replicas = context.num_replicas_in_sync
    if replicas == 1:
        return tf.cast(value, tf.float32)
    local = tf.shape(value)[0]
    index = tf.cast(context.replica_id_in_sync_group, tf.int32)
    pad = [[index * local, (replicas - 1 - index) * local]] + [[0, 0]] * (value.shape.rank - 1)
    return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.pad(tf.cast(value, tf.float32), pad))
