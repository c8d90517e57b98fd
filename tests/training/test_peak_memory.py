"""The peak memory of a stage (`kgreedy.base.peak_memory`): the host's peak RSS
reset and read, its fallback, and how the progress lines show it. The records and
summary of a run carry it: tests/training/test_engine.py (a tiny run),
tests/analysis/test_probe_report.py (the quickstart and its report) and
tests/api/test_api.py (`kgreedy.fit`'s History)."""

import io
import sys

import pytest

from kgreedy.base import peak_memory
from kgreedy.base.peak_memory import (MB, StagePeak, host_peak_bytes, largest_peaks,
                                      reset_host_peak)
from kgreedy.base.progress import Progress, peak_text

BLOCK = 200 * MB
# The kernel's RSS counters are approximate (per-CPU sums, kernel 6.2 on): a read
# may be this far below the last one without anything freed.
SLACK = 4 * MB


def test_a_reset_brings_the_host_peak_down_and_an_allocation_raises_it():
    if not reset_host_peak():
        pytest.skip("this kernel does not let the process reset its peak RSS")
    before = host_peak_bytes()
    block = b"\x01" * BLOCK  # every page written: resident
    raised = host_peak_bytes()
    assert raised - before >= 0.95 * BLOCK, (before / MB, raised / MB)
    del block  # a block this large is unmapped when freed: the RSS falls again
    assert host_peak_bytes() >= raised - SLACK  # a peak stays until it is reset
    assert reset_host_peak()
    assert host_peak_bytes() <= raised - 0.9 * BLOCK, (raised / MB, host_peak_bytes() / MB)


def test_a_stage_peak_reads_the_peak_since_it_began():
    held = b"\x01" * BLOCK
    del held  # a peak before the stage: not the stage's
    peak = StagePeak()
    if peak.since != "stage":
        pytest.skip("this kernel does not let the process reset its peak RSS")
    start = peak.read()
    assert start["peak_memory_mb"] > 0 and start["gpu_peak_memory_mb"] is None
    block = b"\x01" * BLOCK
    during = peak.read()["peak_memory_mb"]
    del block
    assert during - start["peak_memory_mb"] >= 0.95 * BLOCK / MB, (start, during)
    assert peak.read()["peak_memory_mb"] >= during - SLACK / MB


def test_without_a_reset_the_figure_is_the_process_peak(tmp_path, monkeypatch):
    monkeypatch.setattr(peak_memory, "CLEAR_REFS", str(tmp_path / "no" / "clear_refs"))
    assert not reset_host_peak()
    assert StagePeak().since == "process"
    # Without /proc at all, getrusage's peak since the process started.
    monkeypatch.setattr(peak_memory, "STATUS", str(tmp_path / "no" / "status"))
    assert host_peak_bytes() > 10 * MB


def test_no_gpu_without_tensorflow_loaded(monkeypatch):
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    assert peak_memory.gpu_peak_bytes() is None
    peak_memory.reset_gpu_peaks()  # nothing to reset: no error


class _FakeTensorFlow:
    """What the GPU part uses of TensorFlow, for three GPUs: no GPU here."""

    def __init__(self, peaks):
        self.peaks, self.resets = peaks, []
        self.config = self
        self.experimental = self

    def list_logical_devices(self, kind):
        assert kind == "GPU"
        return [type("Device", (), {"name": f"/device:{name}"}) for name in self.peaks]

    def get_memory_info(self, device):
        if device == "CPU:0":  # TensorFlow's default CPU allocator keeps no statistics
            return {"current": 0, "peak": 0}
        if self.peaks[device] is None:
            raise ValueError(f"no memory statistics on {device}")
        return {"current": 0, "peak": self.peaks[device]}

    def reset_memory_stats(self, device):
        if self.peaks[device] is None:
            raise ValueError(f"no memory statistics on {device}")
        self.resets.append(device)


def test_the_gpu_peak_is_the_largest_over_the_gpus_that_keep_statistics(monkeypatch):
    fake = _FakeTensorFlow({"GPU:0": 100 * MB, "GPU:1": 300 * MB, "GPU:2": None})
    monkeypatch.setitem(sys.modules, "tensorflow", fake)
    peak = StagePeak()
    assert fake.resets == ["GPU:0", "GPU:1"]
    assert peak.read()["gpu_peak_memory_mb"] == 300.0
    fake.peaks = {"GPU:2": None}
    assert peak_memory.gpu_peak_bytes() is None


def test_largest_is_per_key_and_ignores_what_is_missing():
    assert largest_peaks({"peak_memory_mb": 3.0, "gpu_peak_memory_mb": None},
                   {"peak_memory_mb": 5.5}, {"stage": 1}) == {
        "peak_memory_mb": 5.5, "gpu_peak_memory_mb": None}
    assert largest_peaks({"gpu_peak_memory_mb": 2.0}, {"gpu_peak_memory_mb": 1.0}) == {
        "peak_memory_mb": None, "gpu_peak_memory_mb": 2.0}


RECORD = {"stage": 2, "epoch": 1, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.4,
          "val_accuracy": 0.85, "learning_rate": 0.05, "images_per_second": 1000.0,
          "seconds": 1.5}


def test_the_epoch_and_stage_lines_show_the_peaks():
    out = io.StringIO()
    progress = Progress(out, live=False)
    progress.epoch_end({**RECORD, "peak_memory_mb": 1536.0, "gpu_peak_memory_mb": None},
                       3, 10)
    progress.stage_end({"stage": 2, "val_accuracy": 0.85, "train_accuracy": 0.8,
                        "seconds": 4.0, "peak_memory_mb": 800.0,
                        "gpu_peak_memory_mb": 3481.6})
    progress.epoch_end(RECORD, 3, 10)  # a record of an older run: no figures
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("1,000 img/s 1.5s peak 1.50 GB"), lines[0]
    assert lines[1] == ("stage 2 done: val acc 0.8500 train acc 0.8000 in 4.0s, "
                        "peak 800 MB GPU 3.40 GB")
    assert lines[2].endswith("1,000 img/s 1.5s"), lines[2]
    assert peak_text({"peak_memory_mb": None, "gpu_peak_memory_mb": 10.0}) == \
        " peak - GPU 10.0 MB"
