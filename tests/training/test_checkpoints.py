"""Finding checkpoints and falling back past damaged ones on resume."""

import os

import numpy as np
import pytest
import tensorflow as tf

from kgreedy.base.errors import KgreedyError
from kgreedy.training.checkpoints import (checkpoint_paths, quarantine, readable_checkpoint,
                                          restore_latest_good)

OLD = ([1.0, 2.0, 3.0] * 100, 7)
NEW = ([4.0, 5.0, 6.0] * 100, 8)
DATA = ".data-00000-of-00001"


def make_checkpoint():
    weights = tf.Variable(np.zeros(300, np.float32))
    step = tf.Variable(0, dtype=tf.int64)
    return tf.train.Checkpoint(weights=weights, step=step), weights, step


@pytest.fixture
def saved(tmp_path):
    """Two checkpoints, OLD then NEW values; returns (directory, [old, new] prefixes)."""
    checkpoint, weights, step = make_checkpoint()
    manager = tf.train.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=2)
    prefixes = []
    for values, count in (OLD, NEW):
        weights.assign(values)
        step.assign(count)
        prefixes.append(manager.save())
    return str(tmp_path), prefixes


def restore(directory):
    checkpoint, weights, step = make_checkpoint()
    warnings = []
    prefix = restore_latest_good(checkpoint, directory, warnings.append)
    return prefix, (weights.numpy().tolist(), int(step.numpy())), warnings


def truncate(path, fraction=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))


def test_paths_come_from_state_file_oldest_first(saved):
    directory, prefixes = saved
    assert checkpoint_paths(directory) == prefixes
    assert [os.path.basename(p) for p in prefixes] == ["ckpt-1", "ckpt-2"]


def test_intact_restores_newest(saved):
    directory, prefixes = saved
    prefix, values, warnings = restore(directory)
    assert prefix == prefixes[1]
    assert values == NEW
    assert warnings == []


@pytest.mark.parametrize("fraction", [0.5, 0.0])
def test_truncated_data_falls_back_to_previous(saved, fraction):
    directory, prefixes = saved
    truncate(prefixes[1] + DATA, fraction)
    prefix, values, warnings = restore(directory)
    assert prefix == prefixes[0]
    assert values == OLD
    assert len(warnings) == 1
    assert warnings[0].startswith(f"checkpoint {prefixes[1]} is unreadable (")
    assert warnings[0].endswith(f"); falling back to {prefixes[0]}")


def test_missing_index_falls_back_to_previous(saved):
    directory, prefixes = saved
    os.remove(prefixes[1] + ".index")
    prefix, values, warnings = restore(directory)
    assert prefix == prefixes[0]
    assert values == OLD
    assert len(warnings) == 1 and "ckpt-2.index is missing" in warnings[0]


def test_corrupt_data_checksum_falls_back(saved):
    directory, prefixes = saved
    with open(prefixes[1] + DATA, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    prefix, values, warnings = restore(directory)
    assert (prefix, values) == (prefixes[0], OLD)
    assert "Checksum does not match" in warnings[0]


@pytest.mark.parametrize("state", [b"garbage {{{", b"", b"\x00\xff\xfe",
                                   b'model_checkpoint_path: "ckpt-2"\nall_mod'])
def test_corrupt_state_file_is_bypassed_by_scanning(saved, state):
    directory, prefixes = saved
    with open(os.path.join(directory, "checkpoint"), "wb") as f:
        f.write(state)
    assert checkpoint_paths(directory) == prefixes
    prefix, values, _ = restore(directory)
    assert (prefix, values) == (prefixes[1], NEW)


def test_state_file_listing_only_the_latest(saved):
    directory, prefixes = saved
    with open(os.path.join(directory, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "ckpt-2"\n')
    assert checkpoint_paths(directory) == prefixes[1:]


def test_scan_sorts_numerically_and_ignores_other_files(tmp_path):
    for name in ["ckpt-10.index", "ckpt-9.index", "ckpt-2.index", "ckpt-x.index",
                 "other-3.index", "ckpt-4.data-00000-of-00001"]:
        (tmp_path / name).write_bytes(b"")
    assert checkpoint_paths(str(tmp_path)) == [
        str(tmp_path / n) for n in ("ckpt-2", "ckpt-9", "ckpt-10")]


def test_all_corrupt_raises(saved):
    directory, prefixes = saved
    truncate(prefixes[1] + DATA)
    os.remove(prefixes[0] + ".index")
    checkpoint, _, _ = make_checkpoint()
    warnings = []
    with pytest.raises(KgreedyError) as info:
        restore_latest_good(checkpoint, directory, warnings.append)
    assert str(info.value) == (
        f"{directory}: every checkpoint is unreadable: ckpt-1 (ckpt-1.index is "
        "missing), ckpt-2 (Read less bytes than requested); received ['ckpt-1', 'ckpt-2']")
    assert len(warnings) == 2
    assert warnings[0].endswith(f"falling back to {prefixes[0]}")
    assert warnings[1].endswith("falling back to none")


def test_empty_or_missing_directory_gives_none(tmp_path):
    assert checkpoint_paths(str(tmp_path)) == []
    assert checkpoint_paths(str(tmp_path / "missing")) == []
    prefix, values, warnings = restore(str(tmp_path))
    assert prefix is None
    assert values == ([0.0] * 300, 0)  # nothing restored
    assert warnings == []
    assert restore(str(tmp_path / "missing"))[0] is None


def test_mismatched_objects_are_not_hidden(saved):
    # A good checkpoint of different objects is a recipe problem, not damage.
    directory, _ = saved
    other = tf.train.Checkpoint(unrelated=tf.Variable(1.0))
    with pytest.raises(AssertionError):
        restore_latest_good(other, directory, lambda message: None)


def test_quarantine_moves_the_damaged_newest_so_it_is_never_latest_again(saved):
    directory, prefixes = saved
    truncate(prefixes[1] + ".index")
    good, damaged = readable_checkpoint(directory)
    assert good == prefixes[0] and [p for p, _ in damaged] == [prefixes[1]]
    target = quarantine(directory, damaged)
    assert sorted(os.listdir(target)) == ["ckpt-2" + DATA, "ckpt-2.index"]
    assert tf.train.latest_checkpoint(directory) == prefixes[0]
    assert checkpoint_paths(directory) == prefixes[:1]
    assert readable_checkpoint(directory) == (prefixes[0], [])
    # A second damaged ckpt-2 later keeps the first one's files.
    for suffix in (".index", DATA):
        with open(prefixes[1] + suffix, "wb") as f:
            f.write(b"x")
    quarantine(directory, [(prefixes[1], "bad")])
    assert sorted(os.listdir(target)) == ["ckpt-2" + DATA, "ckpt-2.index",
                                          "ckpt-2~2" + DATA, "ckpt-2~2.index"]


def test_quarantine_of_every_checkpoint_removes_the_state_file(saved):
    directory, prefixes = saved
    for prefix in prefixes:
        truncate(prefix + DATA)
    good, damaged = readable_checkpoint(directory)
    assert good is None and [p for p, _ in damaged] == prefixes[::-1]
    quarantine(directory, damaged)
    assert sorted(os.listdir(directory)) == ["damaged"]
    assert checkpoint_paths(directory) == [] and restore(directory)[0] is None
