"""Fixtures of the training tests."""

import pytest

from kgreedy.base import machine as base_machine
from kgreedy.training import memory


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """Points kgreedy.base.machine's files at `tmp_path`; returns a writer of fake files."""
    for name in ("MEMINFO", "PROC_CGROUP", "CGROUP_V2", "CGROUP_V1"):
        monkeypatch.setattr(base_machine, name, str(tmp_path / "sys" / name.lower()))
    monkeypatch.setattr(memory, "gpus", lambda: [])  # host memory is what is checked

    def write(name, text):
        path = tmp_path / "sys" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return write
