"""SIGTERM as a request to stop at the next safe point, agreed by every worker.

A scheduler sends SIGTERM before it takes a machine back. Python runs signal
handlers between bytecodes: while stages train, the handler only sets a flag, and
the run checkpoints after the steps in flight (`kgreedy.training.run_actions.
StageCheckpoints`) and stops with `Preempted`. While the run finishes (scoring the
heads, exporting) nothing is left to save and a grace period may be shorter than an
export: the handler then interrupts at once, and the controller removes what was
half-written.
"""

import contextlib
import signal
import threading

import tensorflow as tf


class Interrupted(BaseException):
    """SIGTERM while a run finishes, raised by the handler (not an `Exception`: no
    `except Exception` of Keras or TensorFlow holds it up)."""


class Preemption:
    """Whether SIGTERM arrived, in this process or (`agreed`) any worker.

    Args:
        strategy: the run's `tf.distribute.Strategy`.
        num_workers: workers of the run; with more than one, `agreed` is a
            collective every worker must join.
    """

    def __init__(self, strategy, num_workers):
        self.strategy = strategy
        self.num_workers = num_workers
        self.requested = False
        # What the run does now where SIGTERM interrupts it at once (`finishing`),
        # None while stages train, "" once it is too late to stop.
        self.finishing = None

    @contextlib.contextmanager
    def catching(self, enabled=True):
        """Installs the handler for the block, then puts the previous one back. Not
        `enabled` (no run directory, nothing would be saved) or off the main thread
        (where Python allows no handler): SIGTERM is left alone."""
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            del signum, frame
            first = not self.requested
            self.requested = True
            if first and self.finishing:
                raise Interrupted()

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def agreed(self):
        """Whether any worker got SIGTERM: every worker must agree on when to stop,
        or the others would wait forever in the next collective."""
        if self.num_workers == 1:
            return self.requested
        flag = tf.constant(1.0 if self.requested else 0.0)
        total = self.strategy.reduce(tf.distribute.ReduceOp.SUM,
                                     self.strategy.run(lambda: flag), axis=None)
        return float(total) > 0
