"""Faults of the machine end in one line, their own exit status and a way on
(`kgreedy.base.faults`, `kgreedy.cli.run`): the classifier on fabricated errors, a
checkpoint save that fails leaving nothing behind, and, in-process through the
train front end, a full disk (at a checkpoint, at summary.json) and memory running
out mid-stage, each resumed afterwards. A lost worker with two real workers:
tests/training/test_multiworker.py."""

import errno
import json
import os

import pytest
import tensorflow as tf

from kgreedy import cli, train
from kgreedy.base import errors, faults, files
from kgreedy.base.errors import DiskFull, KgreedyError, LostWorker, OutOfMemory
from kgreedy.training import checkpoints, records
from kgreedy.training.stage import StageLoop

OOM = ("OOM when allocating tensor with shape[3,3,10000000,32] and type float on "
       "/job:localhost/replica:0/task:0/device:CPU:0 by allocator cpu")
HEARTBEATS = ("{{function_node __wrapped__CollectiveReduceV2_Nordering_token_1_device_/job:"
              "worker/replica:0/task:0/device:CPU:0}} Collective ops is aborted by: Error "
              "reported from /job:worker/task:1: The following tasks are unhealthy (stopped "
              "sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed. "
              "[Op:CollectiveReduceV2] name: ")
SOCKET = ("Collective ops is aborted by: Socket closed\nAdditional GRPC error information "
          "[[{{node while/sgd_1/CollectiveReduceV2}}]]")
CLUSTER = {"cluster": {"worker": ["localhost:1111", "localhost:2222"]},
           "task": {"type": "worker", "index": 0}}


def tf_error(kind, message):
    return kind(None, None, message)


# ---------------------------------------------------------- the classifier ----

def test_exit_statuses_are_distinct_and_documented_in_cli():
    assert (cli.EXIT_NONFINITE_LOSS, cli.EXIT_LOST_WORKER, cli.EXIT_OUT_OF_MEMORY,
            cli.EXIT_DISK_FULL, cli.EXIT_PREEMPTED) == (65, 69, 71, 74, 75)
    assert errors.NonFiniteLoss.exit_status == 65 and errors.Preempted.exit_status == 75
    assert (LostWorker.exit_status, OutOfMemory.exit_status, DiskFull.exit_status) == (
        69, 71, 74)


def test_a_lost_worker_named_by_tensorflow(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(CLUSTER))
    fault = faults.classify(tf_error(tf.errors.UnavailableError, HEARTBEATS),
                            resume=lambda: "--resume", checkpoint=lambda: "/r/ckpt-4")
    assert isinstance(fault, LostWorker)
    assert str(fault) == (
        "lost worker 1 (localhost:2222) of 2: it stopped answering (The following tasks "
        "are unhealthy (stopped sending heartbeats)); this is worker 0 (localhost:1111); "
        "rerun every worker's command with --resume (it continues from /r/ckpt-4)")


def test_a_lost_worker_tensorflow_does_not_name_lists_the_cluster(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(CLUSTER))
    for kind in (tf.errors.UnavailableError, tf.errors.CancelledError):
        fault = faults.classify(tf_error(kind, SOCKET))
        assert isinstance(fault, LostWorker), kind
        assert str(fault) == (
            "lost a worker: a peer stopped answering (Socket closed); this is worker 0 "
            "(localhost:1111); the cluster: worker 0 (localhost:1111), worker 1 "
            "(localhost:2222); run every worker's command again")


def test_a_full_disk_names_the_file_and_the_space_left(tmp_path):
    path = tmp_path / "checkpoints" / "stage2" / "ckpt-6.index"
    error = tf_error(tf.errors.ResourceExhaustedError,
                     "{{function_node __wrapped__MergeV2Checkpoints_device_/job:localhost/"
                     f"replica:0/task:0/device:CPU:0}} {path}; No space left on device "
                     "[Op:MergeV2Checkpoints]")
    fault = faults.classify(error, output_flag="--output", resume=lambda: "--resume")
    assert isinstance(fault, DiskFull)
    text = str(fault)
    assert text.startswith(f"disk full: no space left on device writing {path} (")
    assert " free on its filesystem now); " in text
    assert text.endswith("free space there or move the run directory to a disk with room "
                         "and pass its path as --output, then rerun the same command with "
                         "--resume")
    # TensorFlow's temporary shard names the checkpoint it was for.
    temp = f"{tmp_path}/ckpt-6_temp/part-00000-of-00001.data-00000-of-00001.tempstate123"
    error = tf_error(tf.errors.ResourceExhaustedError, f"{temp}; No space left on device")
    assert f"writing {tmp_path}/ckpt-6 (" in str(faults.classify(error))


@pytest.mark.parametrize("code, what", [(errno.ENOSPC, "disk full"),
                                        (errno.EDQUOT, "disk quota exceeded")])
def test_oserrors_of_a_full_disk_from_python_writers(tmp_path, code, what):
    fault = faults.classify(OSError(code, os.strerror(code), str(tmp_path / "a.json")))
    assert isinstance(fault, DiskFull)
    assert str(fault).startswith(f"{what}") and str(tmp_path / "a.json") in str(fault)
    # Without a file name: the run directory the front end gave.
    fault = faults.classify(OSError(code, os.strerror(code)), run_dir=str(tmp_path))
    assert f"writing {tmp_path} (" in str(fault)
    assert str(fault).endswith("free space there, then run the same command again")


def test_out_of_memory_names_the_tensor_its_size_and_the_memory_available():
    fault = faults.classify(tf_error(tf.errors.ResourceExhaustedError, OOM),
                            available_memory=lambda: 3 * 2 ** 30, smaller="a smaller X",
                            resume=lambda: "--resume", checkpoint=lambda: "/r/ckpt-4")
    assert isinstance(fault, OutOfMemory)
    size = faults.format_bytes(3 * 3 * 10_000_000 * 32 * 4)
    assert str(fault) == (
        f"out of memory: allocating a float tensor of shape [3,3,10000000,32] ({size}) on "
        "CPU:0 failed, with 3.00 GB of memory available; use a smaller X, or free memory and "
        "rerun the same command with --resume (it continues from /r/ckpt-4)")
    fault = faults.classify(MemoryError())
    assert str(fault) == ("out of memory: an allocation failed (MemoryError), with the "
                          "memory available unknown; use a smaller batch or a smaller model")


def test_a_fault_is_found_behind_the_error_raised_from_it(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
        except OSError as e:
            raise RuntimeError("a wrapper") from e
    except RuntimeError as e:
        assert isinstance(faults.classify(e), DiskFull)


@pytest.mark.parametrize("error", [
    ValueError("No space left on device"),  # neither an OSError nor TensorFlow's
    OSError(errno.EACCES, "Permission denied", "/x"),
    tf.errors.InvalidArgumentError(None, None, "shape mismatch"),
    tf.errors.UnavailableError(None, None, "DNS resolution failed for storage.example"),
    tf.errors.ResourceExhaustedError(None, None, "quota of requests per minute exceeded"),
    KgreedyError("train.batch_size", "must be positive", 0),
], ids=["value", "eacces", "invalid-argument", "unavailable-dns", "quota", "kgreedy"])
def test_other_errors_are_not_faults(error):
    assert faults.classify(error) is None
    with pytest.raises(type(error)) as raised, faults.translated(run_dir="/x"):
        raise error
    assert raised.value is error


def _fails(error):
    def main(argv):
        del argv
        raise error
    return main


def test_cli_prints_one_line_and_the_traceback_only_with_verbose(tmp_path, capsys):
    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.json"))
    assert cli.run(_fails(error), ["x"]) == 74
    err = capsys.readouterr().err
    assert err.startswith(f"kgreedy: error: disk full: no space left on device writing "
                          f"{tmp_path / 'out.json'} (") and err.count("\n") == 1
    assert cli.run(_fails(error), ["x", "--verbose"]) == 74
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1].startswith("kgreedy: error: disk full")
    with pytest.raises(ZeroDivisionError):  # anything else: its traceback, status 1
        cli.run(_fails(ZeroDivisionError()), ["x"])


# ------------------------------------------------------ a failing save ----

def _manager(directory):
    checkpoint = tf.train.Checkpoint(v=tf.Variable(tf.zeros([50])))
    return tf.train.CheckpointManager(checkpoint, str(directory), max_to_keep=2)


def test_a_save_that_fails_leaves_only_intact_checkpoints(tmp_path, monkeypatch):
    manager = _manager(tmp_path)
    checkpoints.save_checkpoint(manager, 1)

    def full(*args, **kwargs):  # the files are written; the state update fails
        raise tf.errors.ResourceExhaustedError(None, None, "checkpoint; No space left")

    monkeypatch.setattr(manager, "_record_state", full)
    (tmp_path / "ckpt-2_temp").mkdir()  # as TensorFlow's interrupted shards leave it
    (tmp_path / "checkpoint.tmp0a1b").write_text("half")
    with pytest.raises(tf.errors.ResourceExhaustedError):
        checkpoints.save_checkpoint(manager, 2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt-1.data-00000-of-00001",
                                            "ckpt-1.index"]
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-1")


def test_a_checkpoint_the_state_names_already_is_kept(tmp_path, monkeypatch):
    manager = _manager(tmp_path)
    checkpoints.save_checkpoint(manager, 1)

    def sweep_fails():  # after the state names ckpt-2, while deleting old ones
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(manager, "_sweep", sweep_fails)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint(manager, 2)
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-2")
    assert (tmp_path / "ckpt-2.index").exists()


# ------------------------------------------- in-process, the train front end ----

RECIPE = {
    "name": "faulty",
    "seed": 0,
    "data": {"source": "digits"},
    "model": {"blocks": [{"width": 4}, {"width": 8, "downsample": "psi"}]},
    "aux": {"k": 1, "width": 8},
    "train": {"epochs_per_stage": 2, "steps_per_epoch": 2, "batch_size": 16},
    "distribute": {"strategy": "default"},
    "export": {"enabled": False},
}


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(RECIPE))
    return str(path)


def _train(capsys, *argv):
    """(exit status, stderr) of the train command line, in this process."""
    capsys.readouterr()
    status = cli.run(train.main, list(argv))
    return status, capsys.readouterr().err


def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("kgreedy: error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err[-3000:]
    return lines[0]


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_keeps_the_last_intact_one_and_resumes(
        tmp_path, capsys, monkeypatch, recipe_file):
    run_dir = tmp_path / "run"
    stage2 = run_dir / "checkpoints" / "stage2"
    original = tf.train.CheckpointManager.save
    saves = []

    def fills_the_disk(self, checkpoint_number=None, **kwargs):
        saves.append(checkpoint_number)
        if len(saves) < 4:
            return original(self, checkpoint_number=checkpoint_number, **kwargs)
        # Stage 2's second save: what a full disk leaves mid-merge, then its error.
        prefix = stage2 / f"ckpt-{checkpoint_number}"
        (stage2 / f"ckpt-{checkpoint_number}_temp").mkdir()
        prefix.with_name(prefix.name + ".data-00000-of-00001").write_bytes(b"\0" * 100)
        prefix.with_name(prefix.name + ".index").write_bytes(b"")
        raise tf.errors.ResourceExhaustedError(
            None, None, f"{prefix}.index; No space left on device [Op:MergeV2Checkpoints]")

    monkeypatch.setattr(tf.train.CheckpointManager, "save", fills_the_disk)
    status, err = _train(capsys, recipe_file, "--output", str(run_dir))
    assert status == 74
    line = _one_error_line(err)
    assert line.startswith(f"kgreedy: error: disk full: no space left on device writing "
                           f"{stage2}/ckpt-4.index (")
    assert " free on its filesystem now); " in line and "Traceback" not in err
    assert line.endswith(f"then rerun the same command with --resume (it continues from "
                         f"{stage2}/ckpt-2)")
    assert sorted(os.listdir(stage2)) == ["checkpoint", "ckpt-2.data-00000-of-00001",
                                          "ckpt-2.index"]
    assert not (run_dir / ".lock").exists()

    monkeypatch.setattr(tf.train.CheckpointManager, "save", original)
    status, err = _train(capsys, recipe_file, "--output", str(run_dir), "--resume")
    assert status == 0, err[-3000:]
    assert "unreadable" not in err  # nothing damaged was left to skip
    epochs = [(r["stage"], r["epoch"]) for r in
              map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert epochs == [(1, 1), (1, 2), (2, 1), (2, 2)]


@pytest.mark.slow
def test_a_full_disk_at_summary_json_with_verbose_shows_the_traceback_too(
        tmp_path, capsys, monkeypatch, recipe_file):
    run_dir = tmp_path / "run"
    original = records.write_json

    def fills_the_disk(path, obj):
        if path.endswith("summary.json"):
            def write(f):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # names no file
            files.write_atomic(path, write)
        original(path, obj)

    monkeypatch.setattr(records, "write_json", fills_the_disk)
    status, err = _train(capsys, recipe_file, "--output", str(run_dir), "--verbose")
    assert status == 74
    assert "Traceback (most recent call last):" in err
    line = _one_error_line(err)
    assert line.startswith(f"kgreedy: error: disk full: no space left on device writing "
                           f"{run_dir / 'summary.json'} (")
    assert not [n for n in os.listdir(run_dir) if n.startswith(".tmp-")]  # no half file

    monkeypatch.setattr(records, "write_json", original)
    status, err = _train(capsys, recipe_file, "--output", str(run_dir), "--resume")
    assert status == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == [1, 2]


@pytest.mark.slow
def test_out_of_memory_mid_stage_names_the_tensor_and_resumes(
        tmp_path, capsys, monkeypatch, recipe_file):
    run_dir = tmp_path / "run"
    original = StageLoop.train_epoch

    def runs_out(self, *args, **kwargs):
        if self.stage == 2:
            raise tf.errors.ResourceExhaustedError(None, None, OOM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StageLoop, "train_epoch", runs_out)
    status, err = _train(capsys, recipe_file, "--output", str(run_dir))
    assert status == 71
    line = _one_error_line(err)
    size = faults.format_bytes(3 * 3 * 10_000_000 * 32 * 4)
    assert line.startswith(f"kgreedy: error: out of memory: allocating a float tensor of "
                           f"shape [3,3,10000000,32] ({size}) on CPU:0 failed, with ")
    assert " of memory available; use a smaller train.batch_size or a narrower model" in line
    assert line.endswith(f"--resume (it continues from {run_dir}/checkpoints/stage1/ckpt-4)")
    assert "Traceback" not in err

    monkeypatch.setattr(StageLoop, "train_epoch", original)
    status, err = _train(capsys, recipe_file, "--output", str(run_dir), "--resume")
    assert status == 0, err[-3000:]
