"""Saving checkpoints that are whole or absent, finding them, and restoring the
newest one that is intact."""

import contextlib
import os
import re
import shutil

import tensorflow as tf

from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import write_text

_PREFIX = re.compile(r"^ckpt-(\d+)\.index$")

# What reading a damaged checkpoint raises. The C++ checkpoint reader raises
# RuntimeError, which `py_checkpoint_reader` turns into an `OpError` (missing file,
# bad checksum, bad index), but INVALID_ARGUMENT and OUT_OF_RANGE statuses arrive
# as a plain `ValueError` and `IndexError`: a truncated `.data-*` file gives
# `IndexError("Read less bytes than requested")`.
_READ_ERRORS = (tf.errors.OpError, ValueError, IndexError)


def save_checkpoint(manager, number):
    """`manager.save(checkpoint_number=number)`, leaving nothing of a save that fails.

    A save that fails (a full disk, mostly) leaves TensorFlow's temporary
    `ckpt-N_temp/` and, if it got that far, a truncated `ckpt-N.index` and
    `ckpt-N.data-*` that a resume would take for the newest checkpoint. They are
    removed, with a temporary `checkpoint.tmp*` state file, so the directory holds
    intact checkpoints only and its `checkpoint` state still names the newest of
    them; the error propagates. A checkpoint the state names already (the save
    failed after recording it, while deleting old ones) is kept: a resume checks
    it (`restore_latest_good`).

    Args:
        manager: a `tf.train.CheckpointManager` with the default name (`ckpt`).
        number: the checkpoint number (the stage's step).

    Returns:
        The path `manager.save` returns.
    """
    try:
        return manager.save(checkpoint_number=number)
    except BaseException:
        _remove_partial(manager.directory, f"ckpt-{number}")
        raise


def _remove_partial(directory, name):
    """Removes what a failed save of checkpoint `name` (`ckpt-N`) left in `directory`."""
    prefix = os.path.join(directory, name)
    try:
        state = tf.train.get_checkpoint_state(directory)
    except (tf.errors.OpError, ValueError):  # see checkpoint_paths
        state = None
    recorded = state is not None and os.path.abspath(
        state.model_checkpoint_path) == os.path.abspath(prefix)
    try:
        entries = os.listdir(directory)
    except OSError:  # gone, or unreadable: the save's own error is what matters
        return
    for entry in entries:
        path = os.path.join(directory, entry)
        if entry.startswith((name + "_temp", "checkpoint.tmp")) or (
                not recorded and (entry == name + ".index"
                                  or entry.startswith(name + ".data-"))):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):  # as above
                    os.unlink(path)


def checkpoint_paths(directory):
    """The checkpoint prefixes in a directory, oldest first.

    Uses the `checkpoint` state file that `tf.train.CheckpointManager` keeps; when
    it is missing or corrupt, scans for `ckpt-N.index` files and sorts them by N.

    Args:
        directory: a checkpoint directory; it need not exist.

    Returns:
        A list of prefixes (`directory/ckpt-N`), empty when there are none.
    """
    if not tf.io.gfile.isdir(directory):
        return []
    try:
        state = tf.train.get_checkpoint_state(directory)
    except (tf.errors.OpError, ValueError):
        # An empty state file raises ValueError and a binary one UnicodeDecodeError;
        # a text one that does not parse comes back as None.
        state = None
    if state is not None:
        # TensorFlow has made relative paths absolute, and refuses a state without
        # `model_checkpoint_path`; older state files list only that one.
        paths = list(state.all_model_checkpoint_paths)
        if state.model_checkpoint_path not in paths:
            paths.append(state.model_checkpoint_path)
        return paths
    numbered = []
    for name in tf.io.gfile.listdir(directory):
        match = _PREFIX.match(name)
        if match:
            numbered.append((int(match.group(1)), os.path.join(directory, name[:-6])))
    return [prefix for _, prefix in sorted(numbered)]


def _unreadable(prefix):
    """Why the checkpoint at `prefix` cannot be restored, or None if it reads."""
    name = os.path.basename(prefix)
    if not tf.io.gfile.exists(prefix + ".index"):
        return f"{name}.index is missing"
    # Listing rather than globbing: the run directory may contain `[` or `*`.
    if not any(f.startswith(name + ".data-")
               for f in tf.io.gfile.listdir(os.path.dirname(prefix) or ".")):
        return f"{name}.data-* is missing"
    try:
        # Reading every tensor is what catches a truncated or bit-flipped data
        # file; opening the reader only checks the index.
        reader = tf.train.load_checkpoint(prefix)
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
    except _READ_ERRORS as e:
        message = (getattr(e, "message", None) or str(e)).strip()
        first = message.splitlines()[0] if message else type(e).__name__
        return first if len(first) <= 160 else first[:157] + "..."
    return None


def readable_checkpoint(directory):
    """The newest checkpoint in `directory` whose files all read, and the damaged
    ones newer than it.

    The one search for a stage's weights: the resume, `kgreedy.export`,
    `kgreedy.probe` and `--stage N` all go through it. Checkpoints older than the
    first readable one are not read.

    Args:
        directory: a checkpoint directory; it need not exist.

    Returns:
        (prefix or None, [(prefix, reason), ...] of the damaged ones, newest first).
        The list is not empty exactly when the newest checkpoint is damaged.
    """
    damaged = []
    for prefix in checkpoint_paths(directory)[::-1]:
        reason = _unreadable(prefix)
        if reason is None:
            return prefix, damaged
        damaged.append((prefix, reason))
    return None, damaged


def describe(damaged):
    """`unreadable checkpoint ckpt-44 (why)`, or `unreadable checkpoints ckpt-44
    (why), ckpt-22 (why)`: damaged checkpoints in words."""
    return f"unreadable checkpoint{'s' if len(damaged) > 1 else ''} " + _listed(damaged)


def _listed(damaged):
    """`ckpt-44 (why), ckpt-22 (why)`."""
    return ", ".join(f"{os.path.basename(prefix)} ({reason})" for prefix, reason in damaged)


def quarantine(directory, damaged):
    """Moves damaged checkpoints into `directory/damaged/`, so none is "latest" again.

    Only a process holding the run lock may call it: it renames files a concurrent
    reader might be reading. The `checkpoint` state file is rewritten atomically to
    list the checkpoints left (removed when none is), and a name already taken in
    `damaged/` gets a suffix: nothing there is overwritten.

    Args:
        directory: the checkpoint directory.
        damaged: (prefix, reason) pairs, as `readable_checkpoint` gives them.

    Returns:
        The `damaged/` directory.
    """
    target = os.path.join(directory, "damaged")
    os.makedirs(target, exist_ok=True)
    names = {os.path.basename(prefix) for prefix, _ in damaged}
    left = [p for p in checkpoint_paths(directory) if os.path.basename(p) not in names]
    for entry in sorted(os.listdir(directory)):
        base = entry.split(".", 1)[0]
        if base in names and (entry == base + ".index" or entry.startswith(base + ".data-")):
            moved, n = os.path.join(target, entry), 1
            while os.path.lexists(moved):
                n += 1
                moved = os.path.join(target, f"{base}~{n}.{entry.split('.', 1)[1]}")
            os.rename(os.path.join(directory, entry), moved)
    state = os.path.join(directory, "checkpoint")
    if left:
        # TensorFlow's text format, with paths relative to the directory as
        # `tf.train.CheckpointManager` writes them.
        newest = os.path.basename(left[-1])
        write_text(state, f'model_checkpoint_path: "{newest}"\n' + "".join(
            f'all_model_checkpoint_paths: "{os.path.basename(p)}"\n' for p in left))
    elif os.path.exists(state):
        os.unlink(state)
    return target


def restore_latest_good(checkpoint, directory, warn):
    """Restores the newest checkpoint in `directory` whose files all read.

    A checkpoint damaged by a crash or a full disk mid-save is skipped with a
    warning rather than failing; the previous one is used instead.

    Args:
        checkpoint: the `tf.train.Checkpoint` to restore into.
        directory: the checkpoint directory.
        warn: called with one message per checkpoint skipped.

    Returns:
        The prefix restored, or None when the directory holds no checkpoints.

    Raises:
        KgreedyError: there are checkpoints but none of them reads.
        AssertionError: the good checkpoint does not match `checkpoint`'s objects
            (a different recipe), from `assert_existing_objects_matched`.
    """
    prefix, damaged = readable_checkpoint(directory)
    for i, (bad, reason) in enumerate(damaged):
        fallback = damaged[i + 1][0] if i + 1 < len(damaged) else prefix or "none"
        warn(f"checkpoint {bad} is unreadable ({reason}); falling back to {fallback}")
    if prefix is None and damaged:
        raise KgreedyError(directory, "every checkpoint is unreadable: "
                           + _listed(damaged[::-1]),
                           [os.path.basename(p) for p, _ in damaged[::-1]])
    if prefix is not None:
        restore(checkpoint, prefix)
    return prefix


def restore(checkpoint, prefix):
    """Restores `prefix` into `checkpoint`, every object of which must be in it
    (other objects of the file, an optimizer or a later stage's modules, may be left)."""
    checkpoint.restore(prefix).expect_partial().assert_existing_objects_matched()
