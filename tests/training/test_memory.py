"""The memory estimate (`kgreedy.training.memory`): per-stage figures checked against
hand counts, refusal of a recipe that cannot fit (exit 2, one line, nothing
written, no data read), the dry run's memory lines, and reading the available
memory from /proc/meminfo and the cgroup files (faked here)."""

import dataclasses
import json
import os

import keras
import pytest
from keras.src.backend.common import global_state

from kgreedy import cli, recipe_run, train
from kgreedy.base import machine as base_machine
from kgreedy.config.recipe import load_recipe, recipe_from_dict
from kgreedy.data.spec import DatasetSpec, describe
from kgreedy.model.from_recipe import from_recipe
from kgreedy.training import memory

GiB = 2 ** 30

# Digits (8x8x1, 10 classes): block 4@8x8, psi block 8@4x4, BN; k=2 heads of width 4
# (8 at stage 2: doubled at the downsampling), pooled to 2x2.
BASE = {
    "name": "tiny_memory",
    "data": {"source": "digits"},
    "model": {"blocks": [{"width": 4}, {"width": 8, "downsample": "psi"}],
              "batch_norm": True},
    "aux": {"k": 2, "width": 4},
    "train": {"batch_size": 32, "cache_features": "off"},
    "export": {"enabled": False},
}
QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "..", "recipes",
                          "quickstart.json")
# float32 pinned: the figures below are float32's (bfloat16 halves the activations).
HUGE = ["--set", "model.blocks.0.width=10000000", "--set", "train.mixed_precision=none"]


def recipe(**train):
    raw = json.loads(json.dumps(BASE))
    raw["train"].update(train)
    return recipe_from_dict(raw)


def sized(r, spec=None):
    spec = spec or describe(r.data)
    net, stages, note = memory.estimate(r, spec)
    assert note is None and net is not None
    return stages


# ------------------------------------------------------------ estimates ----

def test_estimate_matches_a_hand_count():
    s1, s2 = sized(recipe())
    # Weights: every variable of the net, float32. Block 1: conv 9*1*4 + BN 4*4; head
    # 1: conv 9*4*4 + BN 4*4, BN 4*4 after the 2x2 pool, dense 16*10+10; block 2: conv
    # 9*16*8 + BN 4*8; head 2: conv 9*8*8 + BN 4*8, pooled BN 4*8, dense 32*10+10.
    params = (36 + 16) + (144 + 16 + 16 + 170) + (1152 + 32) + (576 + 32 + 32 + 330)
    assert params == 2552
    assert s1.weights == s2.weights == 4 * params
    # Trainable (BN moving statistics excluded): stage 1 block 1 + head 1, stage 2
    # block 2 + head 2; SGD momentum: one slot; the gradients and three temporaries
    # of their size in the step (GRADIENT_COPIES).
    trainable1 = (36 + 8) + (144 + 8 + 8 + 170)
    trainable2 = (1152 + 16) + (576 + 16 + 16 + 330)
    assert memory.GRADIENT_COPIES == 4
    assert (s1.optimizer, s1.gradients) == (4 * trainable1, 16 * trainable1)
    assert (s2.optimizer, s2.gradients) == (4 * trainable2, 16 * trainable2)
    # Activations per example, in elements. The backward runs the layers in reverse:
    # while one runs, what the layers before it (in build order) keep is alive (the
    # stage's input and their outputs), plus its gradients in and out (a fused BN
    # makes no temporary). Build order: block conv, block BN, head BN, head conv,
    # pooled BN, dense.
    # Stage 1: image 64; the head conv's backward is the peak: the image, the block
    # conv's 8x8x4 = 256, the block BN's 256 and the head BN's 256, then the head
    # conv's gradients 256 + 256.
    stage1 = 64 + 256 + 256 + 256 + (256 + 256)
    # Stage 2: block 1's output 256 (psi'd to 4x4x16), then 4x4x8 = 128 per layer;
    # the head conv's backward again: the input, three outputs of 128, gradients
    # 128 + 128. The frozen block 1's peak (BN: 512) comes before.
    stage2 = 256 + 3 * 128 + (128 + 128)
    image = 4 * 64  # the float32 batch from the pipeline
    # The batch in the step and the five tf.data holds ahead (PIPELINE_BATCHES).
    batches = 1 + memory.PIPELINE_BATCHES
    assert s1.activations == 32 * (batches * image + 4 * stage1) == 221_184
    assert s2.activations == 32 * (batches * image + 4 * stage2) == 163_840
    assert s1.feature_cache == s1.replay_buffers == 0
    # Evaluation (batch 32, forward only): the image, then the largest layer's input
    # and output (a BN's 256 + 256); less than training's, so not in the total.
    assert s1.evaluation == 32 * (image + 4 * 512) == 73_728
    # The data: all 1,797 digits as float32 arrays.
    assert s1.data == 1797 * 64 * 4 == 460_032
    # And TensorFlow's own small tensors, 1 MiB (RUNTIME_BYTES).
    assert (s1.total == 4 * params + 20 * trainable1 + 221_184 + 460_032 + 2 ** 20
            == 1_747_480)
    assert s1.describe() == ("stage 1 1.67 MB (weights 9.97 KB, optimizer 1.46 KB, "
                             "gradients 5.84 KB, activations 216 KB at batch 32, "
                             "data 449 KB, runtime 1.00 MB)")


def test_estimates_grow_with_the_batch_and_the_width():
    base = sized(recipe())
    doubled = sized(recipe(batch_size=64))
    for a, b in zip(base, doubled):
        assert b.activations == 2 * a.activations
        assert (b.weights, b.optimizer, b.gradients) == (a.weights, a.optimizer,
                                                         a.gradients)
    raw = json.loads(json.dumps(BASE))
    raw["model"]["blocks"][0]["width"] = 16
    wider = sized(recipe_from_dict(raw))
    for a, b in zip(base, wider):
        assert b.weights > a.weights and b.activations > a.activations
    assert wider[0].optimizer > base[0].optimizer


def test_mixed_precision_halves_activations_but_not_the_input_or_weights():
    plain = sized(recipe())
    mixed = sized(recipe(mixed_precision="mixed_bfloat16"))
    image = (1 + memory.PIPELINE_BATCHES) * 32 * 4 * 64  # the step's and tf.data's
    for a, b in zip(plain, mixed):
        # Halved, but for BatchNormalization, which computes in float32 (its copy of
        # its input and its backward): more than half of float32's, less than all.
        assert (a.activations - image) // 2 < b.activations - image < a.activations - image
        assert (b.weights, b.optimizer) == (a.weights, a.optimizer)


def test_optimizer_slots_by_optimizer():
    sgd = sized(recipe())[0]
    plain = sized(recipe(optimizer={"momentum": 0.0}))[0]
    adamw = sized(recipe(optimizer={"name": "adamw"}))[0]
    assert plain.optimizer == 0 and adamw.optimizer == 2 * sgd.optimizer


def test_one_stage_modes_and_the_replay_buffers():
    greedy = sized(recipe())
    (joint,) = sized(recipe(mode="end_to_end"))
    assert joint.stage == 2
    # Every block trains, with the last head.
    assert joint.optimizer == greedy[0].optimizer + greedy[1].optimizer - 4 * (
        144 + 8 + 8 + 170)
    (decoupled,) = sized(recipe(mode="decoupled", decoupled={"buffer_size": 64}))
    assert decoupled.optimizer == greedy[0].optimizer + greedy[1].optimizer
    # One buffer of block 1's 8x8x4 outputs, float32; the dry run says the same.
    assert decoupled.replay_buffers == 64 * 256 * 4
    r = recipe(mode="decoupled", decoupled={"buffer_size": 64})
    net = memory.estimate(r, describe(r.data))[0]
    assert recipe_run._buffer_mb(net, 64, r.train) * 2 ** 20 == decoupled.replay_buffers


def test_the_feature_cache_counts_while_in_memory():
    spec = DatasetSpec((8, 8, 1), 10, tuple("0123456789"), num_train=1000, num_eval=200)
    on = sized(recipe(cache_features="on"), spec)
    # Block 1's 8x8x4 outputs of 1,200 examples, float32; stage 2 then reads them.
    assert on[0].feature_cache == 0 and on[1].feature_cache == 1200 * 256 * 4
    # Stage 2 starts from the float32 features: 256 elements of 4 bytes in place of
    # the 64-pixel image and block 1's 256 outputs.
    off = sized(recipe(), spec)[1]
    batches = 1 + memory.PIPELINE_BATCHES  # the step's and tf.data's
    assert on[1].activations == off.activations + 32 * (
        batches * (4 * 256 - 4 * 64) - 4 * 256)
    on_disk = sized(recipe(cache_features="on", cache_memory_mb=0), spec)
    assert on_disk[1].feature_cache == 0


# -------------------------------------------------------- the net's build ----

def test_sizing_allocates_no_weights_and_leaves_keras_as_it_was():
    r = load_recipe(QUICKSTART, ["model.blocks.0.width=10000000"])
    before = list(global_state.get_global_attribute("uninitialized_variables") or [])
    net, stages, _ = memory.estimate(r, describe(r.data))
    assert net.modules[0].conv.kernel.shape == (3, 3, 1, 10_000_000)
    assert stages[0].weights > 90 * GiB
    assert (global_state.get_global_attribute("uninitialized_variables") or []) == before
    with keras.StatelessScope():  # would give the deferred weights values: none left
        pass
    small = load_recipe(QUICKSTART)
    built = from_recipe(small, (8, 8, 1), 10, [0.0], [1.0])
    assert float(keras.ops.std(built.modules[0].conv.kernel)) > 0


# ------------------------------------------------------- command line ----

def test_an_oversize_model_is_refused_before_data_or_run_directory(
        tmp_path, capsys, machine):
    machine("meminfo", "MemTotal: 33554432 kB\nMemAvailable: 16777216 kB\n")
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train.main, [QUICKSTART, "--output", str(output), *HUGE])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    # The weights alone (97 GB) cannot fit: no batch size helps, so the line names the
    # model, not the batch size behind the largest part. The largest stage is 2: it
    # trains a block with 10-million-channel inputs (its gradients and momentum, 429
    # GB), where stage 1 keeps block 1's 10-million-channel map at batch 64 (a fused
    # BN keeps no copy of it).
    assert lines[0].startswith("kgreedy: error: model: stage 2 needs about 831 GB"), lines
    assert "weights 97.0 GB" in lines[0] and "activations 305 GB at batch 64" in lines[0]
    assert "more than the 16.0 GB of memory available" in lines[0]
    assert lines[0].endswith("use a narrower model (model.blocks[*].width, aux.width) or "
                             "fewer stages")
    assert not output.exists()


def test_the_dry_run_prints_each_stage_then_refuses(tmp_path, capsys, machine):
    machine("meminfo", "MemAvailable: 16777216 kB\n")
    assert cli.run(train.main, [QUICKSTART, "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("memory: ")]
    assert [line.split()[1:3] for line in lines[:3]] == [
        ["stage", "1"], ["stage", "2"], ["stage", "3"]]
    assert all("at batch 64, " in line and "data " in line for line in lines[:3])
    assert lines[3].startswith("memory: largest stage 3, ")
    assert lines[3].endswith("; available 16.0 GB")

    with pytest.raises(SystemExit) as exit_info:
        cli.run(train.main, [QUICKSTART, "--dry-run", *HUGE])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "deployed model (trunk + stage 3 head)" in captured.out  # the table first
    assert "memory: largest stage 2, " in captured.out
    assert captured.err.startswith("kgreedy: error: model: stage 2 needs")


def test_unknown_memory_never_refuses(capsys, machine):
    assert base_machine.available_bytes() is None
    memory.check([memory.StageMemory(1, 64, 10 ** 15, 0, 0, 0)], None)
    assert cli.run(train.main, [QUICKSTART, "--dry-run", *HUGE]) == 0
    assert "; available unknown, not checked" in capsys.readouterr().out


def test_nothing_is_checked_where_training_runs_on_gpu(capsys, machine, monkeypatch):
    machine("meminfo", "MemAvailable: 100 kB\n")
    assert memory.available_for_training() == (100 * 1024, None)
    monkeypatch.setattr(memory, "gpus", lambda: ["/physical_device:GPU:0"])
    assert memory.available_for_training() == (None, "not checked: training runs on GPU")
    assert cli.run(train.main, [QUICKSTART, "--dry-run", *HUGE]) == 0
    assert "; available not checked: training runs on GPU" in capsys.readouterr().out


def test_tune_refuses_a_base_that_cannot_fit(machine):
    from kgreedy import tune
    from kgreedy.base.errors import KgreedyError

    r = recipe()
    worst = memory.largest(sized(r))
    # Room for everything but half the activations: a smaller batch would fit.
    room = (worst.total - worst.activations // 2) // 1024
    machine("meminfo", f"MemAvailable: {room} kB\n")
    with pytest.raises(KgreedyError) as error:
        tune.check_memory(r, describe(r.data))
    assert str(error.value).startswith(f"base.train.batch_size: stage {worst.stage} "
                                       "needs about ")
    assert str(error.value).endswith(f"received {r.train.batch_size}")


# ------------------------------------------------------ available memory ----

def test_available_memory_from_meminfo_and_cgroups(machine):
    machine("meminfo", "MemTotal: 8388608 kB\nMemAvailable: 6291456 kB\n")
    assert base_machine.available_bytes() == 6 * GiB  # no cgroup files: meminfo alone
    # cgroup v2 at the root: 4 GiB limit, 3 GiB used of which 1 GiB reclaimable cache.
    machine("cgroup_v2/memory.max", str(4 * GiB))
    machine("cgroup_v2/memory.current", str(3 * GiB))
    machine("cgroup_v2/memory.stat", f"anon 123\ninactive_file {GiB}\n")
    assert base_machine.available_bytes() == 2 * GiB
    machine("cgroup_v2/memory.max", "max\n")
    assert base_machine.available_bytes() == 6 * GiB


def test_available_memory_from_this_process_cgroup_v1(machine):
    machine("meminfo", "MemAvailable: 6291456 kB\n")
    machine("proc_cgroup", "5:cpu,cpuacct:/\n4:memory:/jobs/one\n0::/\n")
    machine("cgroup_v1/memory.limit_in_bytes", "9223372036854771712\n")  # no limit
    machine("cgroup_v1/memory.usage_in_bytes", str(5 * GiB))
    assert base_machine.available_bytes() == 6 * GiB
    machine("cgroup_v1/jobs/one/memory.limit_in_bytes", str(GiB))
    machine("cgroup_v1/jobs/one/memory.usage_in_bytes", str(GiB // 2))
    machine("cgroup_v1/jobs/one/memory.stat", f"total_inactive_file {GiB // 4}\n")
    assert base_machine.available_bytes() == GiB - GiB // 4


def test_refusal_names_the_largest_part():
    stage = memory.StageMemory(2, 128, weights=GiB, optimizer=GiB, gradients=GiB,
                               activations=GiB)
    with pytest.raises(Exception) as error:
        memory.check([stage], 2 * GiB)
    assert str(error.value).startswith("model: stage 2 needs about 4.00 GB (weights")
    memory.check([stage], 4 * GiB + memory.RUNTIME_BYTES)  # fits exactly: no margin
    cache = dataclasses.replace(stage, feature_cache=8 * GiB)
    with pytest.raises(Exception) as error:
        memory.check([stage, cache], 8 * GiB)
    assert str(error.value).startswith("train.cache_memory_mb: stage 2 needs about 12.0 GB")


def test_replicas_on_one_host_each_keep_a_copy_of_the_variables():
    r = recipe()
    spec = describe(r.data)
    one = memory.estimate(r, spec)[1]
    two = memory.estimate(r, spec, replicas=2)[1]
    for a, b in zip(one, two):
        assert (b.weights, b.optimizer, b.gradients) == (2 * a.weights, 2 * a.optimizer,
                                                         2 * a.gradients)
        # The global batch's activations are shared out among the replicas.
        assert (b.activations, b.data) == (a.activations, a.data)
