"""`train.mixed_precision: auto`: bfloat16 where the hardware has it natively, float32
elsewhere; what it chose is printed and recorded in the run's recipe.json, and a
resumed run keeps it. The hardware checks are faked, so every branch runs here."""

import json

import keras
import pytest

from kgreedy import train
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.training import precision

RECIPE = {
    "name": "auto_precision",
    "seed": 0,
    "data": {"source": "digits"},
    "model": {"blocks": [{"width": 4}, {"width": 8, "downsample": "psi"}]},
    "aux": {"k": 1},
    "train": {"epochs_per_stage": 1, "steps_per_epoch": 2, "batch_size": 16,
              "mixed_precision": "auto"},
    "export": {"enabled": False},
}
# The same, saying nothing of precision: the default.
DEFAULT = {**RECIPE, "train": {k: v for k, v in RECIPE["train"].items()
                               if k != "mixed_precision"}}


def fake_machine(monkeypatch, cpu_flags=(), gpus=()):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: set(cpu_flags))
    monkeypatch.setattr(precision, "_gpu_capabilities", lambda: list(gpus))


@pytest.mark.parametrize("cpu_flags, gpus, native, reason", [
    (("avx512f", "avx512_bf16"), (), True, "AVX512-BF16"),
    (("amx_tile", "amx_bf16"), (), True, "AMX-BF16"),
    (("avx512f", "avx512_vnni", "avx2"), (), False, "neither AVX512-BF16 nor AMX"),
    ((), ((8, 0),), True, "compute capability 8.0"),
    # The GPUs decide where there are GPUs, and every one must be capable.
    (("avx512_bf16",), ((7, 5), (8, 6)), False, "compute capability 7.5, under 8.0"),
], ids=["avx512-bf16", "amx", "no-bf16-cpu", "ampere", "mixed-gpus"])
def test_native_bfloat16_reads_the_hardware(monkeypatch, cpu_flags, gpus, native, reason):
    fake_machine(monkeypatch, cpu_flags, gpus)
    found, why = precision.native_bfloat16()
    assert found is native and reason in why
    assert precision.choose("auto")[0] == ("mixed_bfloat16" if native else "none")
    assert precision.policy_name("auto") == ("mixed_bfloat16" if native else "float32")


def test_explicit_precisions_are_left_alone(monkeypatch):
    fake_machine(monkeypatch, ("avx512_bf16",))
    for value in ("none", "mixed_bfloat16", "mixed_float16"):
        recipe = recipe_from_dict({**RECIPE, "train": {**RECIPE["train"],
                                                      "mixed_precision": value}})
        assert precision.resolve(recipe) == (recipe, None)
    assert precision.policy_name("none") == "float32"


def test_this_machines_cpu_flags_are_read():
    flags = precision._cpu_flags()
    # On Linux x86 the flags line is never empty (sse2 at least); elsewhere empty.
    assert isinstance(flags, set)
    if flags:
        assert "sse2" in flags


def test_a_resumed_run_keeps_the_precision_it_started_with(monkeypatch):
    fake_machine(monkeypatch)  # this machine has no bfloat16 ...
    recipe = recipe_from_dict(RECIPE)
    kept, note = precision.resolve(recipe, saved="mixed_bfloat16")  # ... the run did
    assert kept.train.mixed_precision == "mixed_bfloat16"
    assert note == "precision: auto: kept bfloat16, the precision the run started with"
    fresh, note = precision.resolve(recipe, saved=None)
    assert fresh.train.mixed_precision == "none" and "auto chose float32" in note


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(RECIPE))
    yield str(path)
    keras.mixed_precision.set_global_policy("float32")  # the run set it globally


@pytest.mark.slow
def test_auto_is_recorded_printed_and_kept_on_resume(tmp_path, capsys, monkeypatch,
                                                     recipe_file):
    run_dir = str(tmp_path / "run")
    fake_machine(monkeypatch, ("avx512f", "avx512_bf16"))
    assert train.main([recipe_file, "--output", run_dir, "--dry-run"]) == 0
    assert ("precision: auto chose bfloat16 (this CPU has AVX512-BF16)"
            in capsys.readouterr().out)
    assert train.main([recipe_file, "--output", run_dir]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "precision: auto chose bfloat16 (this CPU has AVX512-BF16)"
    saved = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert saved["train"]["mixed_precision"] == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    # Resumed where auto would choose float32: the recipe still matches the run's.
    fake_machine(monkeypatch)
    assert train.main([recipe_file, "--output", run_dir, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "precision: auto: kept bfloat16, the precision the run started with" in out
    assert "nothing to do" in out


def test_auto_is_the_default(monkeypatch):
    recipe = recipe_from_dict(DEFAULT)
    assert recipe.train.mixed_precision == "auto"
    fake_machine(monkeypatch, ("avx512f", "amx_bf16"))
    assert precision.resolve(recipe)[0].train.mixed_precision == "mixed_bfloat16"
    fake_machine(monkeypatch, ("avx512f", "avx2"))
    assert precision.resolve(recipe)[0].train.mixed_precision == "none"


@pytest.mark.slow
def test_auto_without_native_bfloat16_trains_in_float32(tmp_path, capsys, monkeypatch,
                                                        recipe_file):
    # The default recipe, which says nothing of precision, on a CPU without bfloat16.
    with open(recipe_file, "w", encoding="utf-8") as f:
        json.dump(DEFAULT, f)
    fake_machine(monkeypatch, ("avx512f", "avx512_vnni"))
    assert train.main([recipe_file, "--output", str(tmp_path / "run")]) == 0
    assert ("precision: auto chose float32 (this CPU has neither AVX512-BF16 nor AMX)"
            in capsys.readouterr().out)
    saved = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert saved["train"]["mixed_precision"] == "none"
    assert keras.mixed_precision.global_policy().name == "float32"
