"""`python kill_after_checkpoint.py ARGS...`: `python -m kgreedy.train ARGS...` that
kills itself by SIGKILL right after the checkpoint of step $KILL_AT is on disk (a
process killed mid-stage, for the resume tests)."""

import os
import runpy
import signal

import tensorflow as tf

_KILL_AT = int(os.environ["KILL_AT"])
_save = tf.train.CheckpointManager.save


def _save_then_die(self, *args, **kwargs):
    path = _save(self, *args, **kwargs)
    if kwargs.get("checkpoint_number") == _KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return path


tf.train.CheckpointManager.save = _save_then_die
runpy.run_module("kgreedy.train", run_name="__main__", alter_sys=True)
