"""A second process on a live run's directory changes nothing in it (issue 25,
defects 1, 2 and 11): the run lock is taken, with the directory, before anything
in --output is written or removed, and the disk image cache is never reopened for
writing. Two real `kgreedy.train` processes, each held at a chosen point so that
the two overlap the same way every time; and, in this process, what a refused or
failed run leaves behind."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kgreedy import cli, train, tune
from kgreedy.data.stores import PackedStore
from test_runlock import read_only_below  # same folder: on sys.path under pytest

ROOT = str(next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file()))
QUICKSTART = os.path.join(ROOT, "recipes", "quickstart.json")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}
TINY = ["--set", "train.epochs_per_stage=1", "--set", "train.steps_per_epoch=2"]
# Two small stages: the held run pauses before the last one.
TWO_STAGES = ["--set", 'model.blocks=[{"width": 8}, {"width": 8, "downsample": "psi"}]',
              "--set", "aux.k=1", "--set", "aux.width=8"]
FOLDER = ["--set", "data.source=image_folder", "--set", "data.image_size=16",
          "--set", "data.channels=3", "--set", "data.eval_fraction=0.25",
          "--set", "train.batch_size=8"]
WAIT = 180  # seconds a process may take to reach its pause point on a busy machine

# `python -c RUNNER PREFIX POINTS ARGV...`: the train command line, paused at each
# of POINTS (comma-separated) until the file PREFIX.POINT.go exists, after writing
# PREFIX.POINT.paused. `before_check`/`after_check`: just before/after the chief's
# first look at --output (where two runs on one new directory could both find it
# free); `stage2`: before stage 2, the run directory then holding stage 1's files
# and the lock, the disk image cache mapped.
RUNNER = """
import os, sys, time
from kgreedy import quiet
prefix, points, *argv = sys.argv[1:]
points = points.split(",")
quiet.install(argv)
from kgreedy import cli, train
from kgreedy.training import run
from kgreedy.training.controller import GreedyTrainer

def pause(point):
    if point in points:
        open(f"{prefix}.{point}.paused", "w").close()
        deadline = time.monotonic() + %d
        while not os.path.exists(f"{prefix}.{point}.go") and time.monotonic() < deadline:
            time.sleep(0.05)

check = run.check_run_dir
def check_run_dir(path, **kwargs):
    first = not kwargs.get("locked")
    if first:
        pause("before_check")
    resumes = check(path, **kwargs)
    if first:
        pause("after_check")
    return resumes
run.check_run_dir = check_run_dir

fit_stage = GreedyTrainer._fit_stage
def _fit_stage(self, stage, *args, **kwargs):
    if stage == 2:
        pause("stage2")
    return fit_stage(self, stage, *args, **kwargs)
GreedyTrainer._fit_stage = _fit_stage
sys.exit(cli.run(train.main, argv))
""" % WAIT


class Held:
    """A train process paused at each of `points` (see RUNNER) until `go(point)`."""

    def __init__(self, tmp_path, name, points, *argv):
        self.prefix = tmp_path / name
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(self.prefix), ",".join(points), *argv],
            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_paused(self, point):
        marker = Path(f"{self.prefix}.{point}.paused")
        deadline = time.monotonic() + WAIT
        while not marker.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                out, err = self.proc.communicate()
                pytest.fail(f"never reached {point} (status {self.proc.returncode}):\n"
                            f"{out[-2000:]}\n{err[-3000:]}")
            time.sleep(0.05)

    def go(self, point):
        Path(f"{self.prefix}.{point}.go").touch()

    def finish(self, point):
        """Lets the process go on from `point` to its end: (status, stdout, stderr)."""
        self.go(point)
        out, err = self.proc.communicate(timeout=WAIT)
        return self.proc.returncode, out, err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("kgreedy: error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def png_folder(root, count=12, bad=False):
    """Two class folders of `count` small PNGs each (files that are not images if
    `bad`)."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        os.makedirs(root / name)
        for i in range(count):
            if bad:
                (root / name / f"{i}.png").write_text("not an image")
            else:
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), np.uint8)).save(
                    root / name / f"{i}.png")
    return root


def assert_finished(run_dir, status, out, err):
    assert status == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["stage"] == 2
    assert os.path.isfile(os.path.join(summary["final"]["export_path"], "saved_model.pb"))
    assert not (run_dir / ".lock").exists()
    assert f"summary {run_dir / 'summary.json'}" in out


# -------------------------------------------------- two real processes ----

@pytest.mark.slow
def test_a_run_with_bad_data_cannot_delete_a_live_runs_directory(tmp_path):
    # A and B both look at the new --output and find it free; A then makes it, takes
    # the lock and trains stage 1; B goes on with data it cannot read. At 71507e3 B
    # then removed the whole directory, A's files and lock included (issue 25, 1).
    run_dir = tmp_path / "run"
    bad = png_folder(tmp_path / "bad", count=3, bad=True)
    a = Held(tmp_path, "a", ["after_check", "stage2"], QUICKSTART, "--output", str(run_dir),
             *TINY, *TWO_STAGES)
    b = Held(tmp_path, "b", ["after_check"], QUICKSTART, "--output", str(run_dir), *TINY,
             *FOLDER, "--set", f"data.data_dir={bad}")
    try:
        b.wait_paused("after_check")
        a.wait_paused("after_check")
        assert not run_dir.exists()
        a.go("after_check")
        a.wait_paused("stage2")
        status, _, err = b.finish("after_check")
        assert status == 2
        line = one_error_line(err)
        assert line.startswith("kgreedy: error: --output: is in use by another kgreedy "
                               f"process (pid {a.proc.pid} on ")
        assert line.endswith(f"wait for it to finish or stop it; received '{run_dir}'")
        assert {"recipe.json", "summary.json", ".lock"} <= set(os.listdir(run_dir))
        assert_finished(run_dir, *a.finish("stage2"))
    finally:
        a.kill()
        b.kill()


@pytest.mark.slow
def test_a_resume_on_a_live_run_is_refused_and_leaves_its_disk_cache_alone(tmp_path):
    # A keeps its decoded images on disk, memory-mapped. At 71507e3 a --resume of A's
    # run reopened cache/images/*/values.bin for writing while reading its data,
    # before the lock: A died of SIGBUS and B took its "stale" lock (issue 25, 2).
    run_dir = tmp_path / "run"
    photos = png_folder(tmp_path / "photos")
    argv = [QUICKSTART, "--output", str(run_dir), *TINY, *TWO_STAGES, *FOLDER,
            "--set", f"data.data_dir={photos}", "--set", "data.cache=disk"]
    a = Held(tmp_path, "a", ["stage2"], *argv)
    b = Held(tmp_path, "b", ["before_check"], *argv, "--resume")  # starts meanwhile
    try:
        a.wait_paused("stage2")
        caches = [run_dir / "cache" / "images" / split / "values.bin"
                  for split in ("train", "eval")]
        before = [(os.stat(p).st_ino, os.stat(p).st_mtime_ns, p.read_bytes()) for p in caches]
        b.wait_paused("before_check")
        status, _, err = b.finish("before_check")
        assert status == 2
        assert one_error_line(err).startswith(
            "kgreedy: error: --output: is in use by another kgreedy process "
            f"(pid {a.proc.pid} on ")
        after = [(os.stat(p).st_ino, os.stat(p).st_mtime_ns, p.read_bytes()) for p in caches]
        assert after == before  # not truncated, rewritten or removed
        assert json.loads((run_dir / ".lock").read_text())["pid"] == a.proc.pid
        assert_finished(run_dir, *a.finish("stage2"))
        assert not (run_dir / "cache").exists()  # A removed its own cache at the end
    finally:
        a.kill()
        b.kill()


# ------------------------------------------------------- in this process ----

def run_cli(main, capsys, *argv):
    """(exit status, stderr) of a front end run in this process."""
    capsys.readouterr()
    try:
        status = cli.run(main, list(argv))
    except SystemExit as e:  # kgreedy.cli.fail: a KgreedyError's one line
        status = e.code
    return status, capsys.readouterr().err


def test_a_data_error_leaves_no_directory_it_made(tmp_path, capsys):
    # The lock now comes before the data, with the directory: a run whose data
    # cannot be read must take both away again, the parents it made included. At
    # 71507e3 the disk cache's folders were made while reading, and only --output
    # itself was removed after the error, leaving "new".
    bad = png_folder(tmp_path / "bad", count=3, bad=True)
    status, err = run_cli(train.main, capsys, QUICKSTART, "--output",
                          str(tmp_path / "new" / "run"), *TINY, *FOLDER,
                          "--set", f"data.data_dir={bad}", "--set", "data.cache=disk")
    assert status == 2
    assert one_error_line(err).startswith("kgreedy: error: data.data_dir: ")
    assert sorted(os.listdir(tmp_path)) == ["bad"]
    # A directory that was there before stays, as empty as it was.
    (tmp_path / "empty").mkdir()
    status, _ = run_cli(train.main, capsys, QUICKSTART, "--output", str(tmp_path / "empty"),
                        *TINY, *FOLDER, "--set", f"data.data_dir={bad}",
                        "--set", "data.cache=disk")
    assert status == 2 and os.listdir(tmp_path / "empty") == []



def test_an_unwritable_output_is_one_line_for_train_and_tune(tmp_path, capsys, monkeypatch):
    # At 71507e3: an OSError traceback and status 1 (issue 25, 11).
    (tmp_path / "afile").write_text("x")
    under_file = tmp_path / "afile" / "run"
    status, err = run_cli(train.main, capsys, QUICKSTART, "--output", str(under_file),
                          *TINY)
    assert status == 2
    assert one_error_line(err) == (f"kgreedy: error: --output: cannot be created (Not a "
                                   f"directory: {tmp_path / 'afile'}); received "
                                   f"'{under_file}'")
    read_only_below(monkeypatch, tmp_path / "ro")
    status, err = run_cli(train.main, capsys, QUICKSTART, "--output",
                          str(tmp_path / "ro" / "run"), *TINY)
    assert status == 2
    assert one_error_line(err) == ("kgreedy: error: --output: cannot be created (Read-only "
                                   f"file system: {tmp_path / 'ro'}); received "
                                   f"'{tmp_path / 'ro' / 'run'}'")
    base = {"name": "tiny", "model": {"blocks": [{"width": 4}, {"width": 8,
                                                                 "downsample": "psi"}]},
            "aux": {"k": 1, "width": 4}, "export": {"enabled": False}}
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "tune.json").write_text(json.dumps(
        {"name": "tune_tiny", "base": "base.json", "search": {"head": ["linear"]},
         "max_trials": 1, "stages": 1, "epochs_per_trial": 1}))
    status, err = run_cli(tune.main, capsys, str(tmp_path / "tune.json"), "--output",
                          str(tmp_path / "ro" / "search"))
    assert status == 2
    assert one_error_line(err) == ("kgreedy: error: --output: cannot be created (Read-only "
                                   f"file system: {tmp_path / 'ro'}); received "
                                   f"'{tmp_path / 'ro' / 'search'}'")
    assert sorted(os.listdir(tmp_path)) == ["afile", "base.json", "tune.json"]


def test_the_disk_cache_never_rewrites_a_values_file_another_process_reads(tmp_path):
    # A reader of the old values.bin (a live run's memory map) keeps its bytes: the
    # new file is written aside and renamed into place. At 71507e3 the file was
    # opened with "wb", truncating it under the reader (SIGBUS for a map).
    directory = tmp_path / "train"
    directory.mkdir()
    (directory / "values.bin").write_bytes(b"\x07" * 48)
    (directory / "other").write_text("not the store's")
    with open(directory / "values.bin", "rb") as reader:
        store = PackedStore(np.uint8, 3, str(directory))
        store.extend(np.ones([2, 2, 4, 3], np.uint8))
        store.finish()
        assert reader.read() == b"\x07" * 48
    assert (directory / "values.bin").read_bytes() == b"\x01" * 48
    assert store.nbytes == 48
    store.remove()
    # Only what the store wrote goes; the folder it did not make stays.
    assert sorted(os.listdir(directory)) == ["other"]
    made = PackedStore(np.uint8, 3, str(tmp_path / "cache" / "eval"))
    made.extend(np.ones([1, 2, 2, 3], np.uint8))
    made.finish().remove()
    assert sorted(os.listdir(tmp_path)) == ["train"]  # the folders it made are gone
