"""Local objectives in the engine (`aux.objective`, issue 26): each objective trains
the quickstart to 0.95 and exports in greedy and decoupled modes; the export is the
same network whatever the objective; a decoupled step keeps module j's update a
function of module j's own losses, bit for bit; a run killed mid-stage resumes bit
for bit (parts, optimizers and replay buffers with their images); the head of a
module trained without it learns without changing the module; recipes are checked.

The command lines start together in one module fixture, one thread each.
"""

import concurrent.futures
import json
import re
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

from kgreedy.base.errors import RecipeError
from kgreedy.config.recipe import load_recipe, recipe_from_dict
from kgreedy.data.spec import DatasetSpec
from kgreedy.model.from_recipe import from_recipe
from kgreedy.model.network import count_params
from kgreedy.training import memory
from kgreedy.training.decoupled import DecoupledLoop

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())
QUICKSTART = ROOT / "recipes" / "quickstart.json"
ENV = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1",
       **os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
OBJECTIVES = ("infopro", "infopro_contrast")
MODES = ("greedy", "decoupled")

# The resume check: a small decoupled run with a replay buffer, killed by SIGKILL
# right after the checkpoint of step KILL_AT (epoch 2, step 2).
STEPS, KILL_AT = 6, 8
RESUME = {"aux.objective": "infopro_contrast", "train.mode": "decoupled",
          "train.epochs_per_stage": 2, "train.steps_per_epoch": STEPS,
          "train.steps_per_execution": 2, "train.checkpoint_every_steps": 2,
          "train.batch_size": 32, "train.decoupled.buffer_size": 64,
          "train.deterministic": True, "train.mixed_precision": "none",
          "aux.width": 8, "export.enabled": False,
          "model.blocks": [{"width": 8}, {"width": 16, "downsample": "psi"},
                           {"width": 16, "downsample": "psi"}]}
# Dies by SIGKILL right after the checkpoint of step KILL_AT is on disk.
KILLER = Path(__file__).with_name("kill_after_checkpoint.py")


def _run(run_dir, sets, *extra, killer=False):
    args = [str(QUICKSTART), "--output", str(run_dir), *extra]
    for key, value in sets.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    code = [str(KILLER)] if killer else ["-m", "kgreedy.train"]
    proc = subprocess.run([sys.executable, *code, *args], capture_output=True, text=True,
                          env={**ENV, "KILL_AT": str(KILL_AT)}, cwd=ROOT, timeout=900)
    return run_dir, proc.returncode, proc.stdout, proc.stderr


def _killed_then_resumed(run_dir):
    killed = _run(run_dir, RESUME, killer=True)
    return killed, _run(run_dir, RESUME, "--resume")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    pool = concurrent.futures.ThreadPoolExecutor(6)
    try:
        # Half the quickstart's 12 epochs per stage: 0.96-0.98 on this machine, and
        # the suite's time.
        futures = {(objective, mode): pool.submit(
            _run, root / f"{objective}_{mode}",
            {"aux.objective": objective, "train.mode": mode, "train.epochs_per_stage": 6})
            for objective in OBJECTIVES for mode in MODES}
        futures["unbroken"] = pool.submit(_run, root / "unbroken", RESUME)
        futures["killed"] = pool.submit(_killed_then_resumed, root / "killed")
        yield futures
    finally:
        pool.shutdown(wait=True)


@pytest.fixture(scope="module", autouse=True)
def _launch_first(request):
    """The command lines start before this file's first test and run meanwhile."""
    if any(item.module is request.module and "launched" in item.fixturenames
           for item in request.session.items):
        request.getfixturevalue("launched")


def _ok(result):
    run_dir, status, out, err = result
    assert status == 0, f"{run_dir.name}: {out[-1500:]}{err[-3000:]}"
    return run_dir, out


def _variables(path):
    """{name: tensor} of a checkpoint or a SavedModel's variables, object graph left out."""
    reader = tf.train.load_checkpoint(str(path))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _quickstart(objective, mode="greedy"):
    raw = json.loads(QUICKSTART.read_text())
    raw["aux"]["objective"] = objective
    raw["train"]["mode"] = mode
    return recipe_from_dict(raw)


def _net(recipe):
    keras.utils.set_random_seed(0)
    return from_recipe(recipe, (8, 8, 1), 10, [4.9], [6.0])


# --------------------------------------------------------- the command line ----

@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("mode", MODES)
def test_each_objective_trains_the_quickstart_and_exports(launched, objective, mode):
    run_dir, out = _ok(launched[(objective, mode)].result())
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["final"]
    assert final["val_accuracy"] >= 0.95, (objective, mode, final)
    # Every head learnt, the heads of modules trained without them too (as probes).
    assert min(final["head_val_accuracies"]) >= 0.8, final["head_val_accuracies"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
               .splitlines()]
    assert all(np.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in records)
    export = Path(final["export_path"])
    # The export holds the deployed network of a cross-entropy run, weight for weight
    # by shape: a decoder or projection head would add weights. (Keras' export
    # archive lists its model's weights under `variables/`, and again under
    # `_all_variables/`.)
    deployed = _net(_quickstart("cross_entropy")).deployed_model()
    exported = [v for name, v in _variables(export / "variables" / "variables").items()
                if name.startswith("variables/")]
    assert sorted(v.shape for v in exported) == sorted(tuple(w.shape)
                                                        for w in deployed.weights)
    assert sum(v.size for v in exported) == count_params(deployed.weights)


@pytest.mark.slow
def test_an_infopro_contrast_run_killed_mid_stage_resumes_bit_for_bit(launched):
    (run_dir, status, _, err), resumed = launched["killed"].result()
    assert status == -signal.SIGKILL, err[-3000:]
    _, out = _ok(resumed)
    assert f"stage 3: resuming at epoch 2, step {KILL_AT - STEPS} of {STEPS}" in out, out
    reference_dir, _ = _ok(launched["unbroken"].result())
    latest = [tf.train.latest_checkpoint(str(d / "checkpoints" / "stage3"))
              for d in (run_dir, reference_dir)]
    assert all(p.endswith(f"ckpt-{2 * STEPS}") for p in latest), latest
    resumed_values, unbroken = (_variables(p) for p in latest)
    assert resumed_values.keys() == unbroken.keys()
    # The parts (decoders, projection heads) and the buffers' images are saved.
    for prefix in ("parts/0/decoder/", "parts/2/projection/", "buffers/1/images/"):
        assert any(k.startswith(prefix) for k in unbroken), (prefix, sorted(unbroken))
    for name, value in unbroken.items():
        np.testing.assert_array_equal(resumed_values[name], value, err_msg=name)


# ----------------------------------------------------------- in process ----

def _batch(count=32):
    x, y = load_digits(return_X_y=True)
    return (tf.constant(x[:count].reshape(-1, 8, 8, 1).astype("float32")),
            tf.constant(y[:count].astype("int32")))


def _every_layer(net):
    """(module index, layer) of every module, head and part."""
    return [(j, layer) for j, (module, head, parts) in enumerate(
        zip(net.modules, net.heads, net.parts), start=1)
        for layer in (module, head, *parts.values())]


def _after_one_step(recipe, change=None):
    """Every weight of every module, head and part after one decoupled step from the
    same start; `change(net)` alters the net before the step."""
    net = _net(recipe)
    if change is not None:
        change(net)
    strategy = tf.distribute.get_strategy()
    loop = DecoupledLoop(net, recipe.train, strategy, 1)
    loop.train_epoch(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(_batch())))
    return [{w.path: w.numpy().copy() for w in layer.weights}
            for _, layer in _every_layer(net)]


def _scale(layers):
    def change(net):
        for layer in layers(net):
            for w in layer.trainable_weights:
                w.assign(w * 1.5 + 0.01)
    return change


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_module_j_after_a_decoupled_step_depends_on_its_own_losses_only(objective):
    """Changing module 3's head and parts changes nothing of modules 1 and 2, bit for
    bit; changing module 2's own decoder changes module 2 (the check can fail)."""
    recipe = _quickstart(objective, "decoupled")
    plain = _after_one_step(recipe)
    later = _after_one_step(recipe, _scale(
        lambda net: [net.heads[2], *net.parts[2].values()]))
    own = _after_one_step(recipe, _scale(lambda net: [net.parts[1]["decoder"]]))
    stages = [j for j, _ in _every_layer(_net(recipe))]
    compared = 0
    for index, stage in enumerate(stages):
        if stage < 3:
            for path, value in plain[index].items():
                np.testing.assert_array_equal(later[index][path], value, err_msg=path)
                compared += 1
    assert compared > 20
    module2 = stages.index(2)  # module 2 itself comes first among its layers
    assert any(not np.array_equal(own[module2][path], value)
               for path, value in plain[module2].items()), \
        "module 2 ignored its own decoder: the comparison would be empty"


def test_a_head_trained_without_its_module_gives_the_module_no_gradient():
    net = _net(_quickstart("infopro_contrast"))
    images, labels = _batch(8)
    features = net.features(images, 1)
    with tf.GradientTape(persistent=True) as tape:
        logits, losses, _ = net.module_losses(2, features, labels, images)
        head_loss = tf.reduce_mean(losses["cross_entropy"])
        total = tf.reduce_mean(losses["total"])
    module = net.modules[1].trainable_weights
    assert all(g is None for g in tape.gradient(head_loss, module))
    assert all(g is not None for g in tape.gradient(head_loss, net.heads[1].trainable_weights))
    assert all(g is not None for g in tape.gradient(total, module))  # rec + contrastive
    # The last module trains through its head: the deployed classifier.
    last_features = net.features(images, 2)
    with tf.GradientTape() as tape:
        _, losses, _ = net.module_losses(3, last_features, labels, images)
        head_loss = tf.reduce_mean(losses["cross_entropy"])
    assert all(g is not None for g in tape.gradient(head_loss,
                                                    net.modules[2].trainable_weights))
    assert logits.shape == (8, 10)


def test_infopro_scales_the_head_gradient_into_the_module_by_w_task():
    """InfoPro's module gets w_task x its head's cross-entropy gradient, the head all
    of it: against the same net trained on cross-entropy alone."""
    raw = json.loads(QUICKSTART.read_text())
    raw["aux"].update(objective="infopro", objective_weights={"first": [1.0, 0.25],
                                                              "last": [1.0, 0.25]})
    infopro, plain = _net(recipe_from_dict(raw)), _net(_quickstart("cross_entropy"))
    images, labels = _batch(8)
    grads = []
    for net in (infopro, plain):
        with tf.GradientTape() as tape:
            _, losses, _ = net.module_losses(1, net.standardize(images), labels, images)
            head_loss = tf.reduce_mean(losses["cross_entropy"])
        grads.append(tape.gradient(head_loss, net.modules[0].trainable_weights
                                   + net.heads[0].trainable_weights))
    count = len(infopro.modules[0].trainable_weights)
    for mine, theirs in zip(grads[0][:count], grads[1][:count]):
        np.testing.assert_allclose(mine, 0.25 * theirs, rtol=1e-5, atol=1e-7)
    for mine, theirs in zip(grads[0][count:], grads[1][count:]):  # the head: whole
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7)


def test_the_net_scales_raw_pixels_by_the_source_white_and_counts_the_parts():
    digits = _net(_quickstart("infopro"))
    assert digits.pixel_max == 16.0  # load_digits' 0..16
    np.testing.assert_allclose(digits.images01(tf.constant([[-3.0, 8.0, 16.0, 40.0]])),
                               [[0.0, 0.5, 1.0, 1.0]])
    plain = _net(_quickstart("cross_entropy"))
    assert plain.parts == [{}, {}, {}]
    assert "parts" not in plain.checkpoint_objects(3)  # cross-entropy runs as before
    assert len(digits.checkpoint_objects(2)["parts"]) == 2
    from kgreedy.model.network import parameter_table
    with_parts, without = parameter_table(digits), parameter_table(plain)
    for a, b in zip(with_parts, without):
        assert a["deployed_params"] == b["deployed_params"]
        assert a["trainable_params"] > b["trainable_params"]  # the decoder's weights
    assert ([layer.name for layer in digits.deployed_model().layers]
            == [layer.name for layer in plain.deployed_model().layers])


def test_memory_counts_the_decoder_and_the_buffered_images():
    spec = DatasetSpec((32, 32, 3), 10, tuple("abcdefghij"))
    raw = json.loads((ROOT / "recipes" / "resnet32_cifar10_k4_decoupled.json").read_text())
    raw["train"]["decoupled"] = {"buffer_size": 256}
    sizes = {}
    for objective in ("cross_entropy", "infopro"):
        raw["aux"]["objective"] = objective
        _, stages, note = memory.estimate(recipe_from_dict(raw), spec)
        assert note is None
        sizes[objective] = stages[-1]
    assert sizes["infopro"].activations > sizes["cross_entropy"].activations
    # Three buffers of 256 images of 32x32x3 float32 more.
    assert (sizes["infopro"].replay_buffers - sizes["cross_entropy"].replay_buffers
            == 3 * 256 * 32 * 32 * 3 * 4)


@pytest.mark.parametrize("aux,train,fragment", [
    ({"objective": "contrastive"}, {}, "aux.objective: must be one of"),
    ({"objective_weights": {"first": [1, 1], "last": [0, 1]}}, {},
     "aux.objective_weights: only applies to aux.objective"),
    ({"objective": "infopro", "objective_weights": {"first": [1], "last": [0, 1]}}, {},
     "aux.objective_weights.first: must be two finite weights >= 0"),
    ({"objective": "infopro", "objective_weights": {"first": [1, 1], "last": [-1, 1]}},
     {}, "aux.objective_weights.last: must be two finite weights >= 0"),
    ({"objective": "infopro", "objective_weights": {"first": [1, 1]}}, {},
     "aux.objective_weights.last"),
    ({"objective": "infopro_contrast"}, {"cache_features": "on"},
     "train.cache_features: 'on' cannot serve aux.objective 'infopro_contrast'"),
])
def test_bad_objective_recipes_are_refused_by_key(aux, train, fragment):
    raw = json.loads(QUICKSTART.read_text())
    raw["aux"].update(aux)
    raw["train"].update(train)
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw)
    assert str(info.value).startswith(fragment), str(info.value)


def test_the_infopro_recipes_load_and_differ_only_in_their_modules():
    k4 = load_recipe(ROOT / "recipes" / "resnet32_cifar10_k4_infopro.json")
    k8 = load_recipe(ROOT / "recipes" / "resnet32_cifar10_k8_infopro.json")
    for recipe, modules in ((k4, 4), (k8, 8)):
        assert recipe.aux.objective == "infopro_contrast"
        assert recipe.train.mode == "decoupled" and recipe.num_stages == modules
    assert k4.train == k8.train and k4.data == k8.data


def _small_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="mid")(h)
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="top")(h)
    return keras.Model(inputs, h)


def test_split_and_fit_take_the_objective_and_fit_json_records_it(tmp_path):
    import kgreedy
    model = _small_model()
    net = kgreedy.split(model, at=["stem", "mid"], num_classes=10, mean=5.0, std=6.0,
                        head=kgreedy.heads.Conv(k=1, width=4), pixel_max=16,
                        objective="infopro_contrast",
                        objective_weights=((4.0, 0.0), (1.0, 1.0)),
                        batch_norm_momentum=0.5)  # settles in a fit's 2 steps: no warning
    assert [sorted(p) for p in net.parts] == [["decoder", "projection", "weights"]] * 3
    assert [p["weights"].w_rec for p in net.parts] == [4.0, 2.5, 1.0]
    assert net.pixel_max == 16.0
    x, y = load_digits(return_X_y=True)
    ds = tf.data.Dataset.from_tensor_slices(
        (x[:64].reshape(-1, 8, 8, 1).astype("float32"), y[:64].astype("int32"))).batch(32)
    weights_before = len(model.weights)
    history = kgreedy.fit(net, ds, ds, epochs_per_stage=1, mode="decoupled", verbose=0,
                          run_dir=tmp_path / "run",
                          optimizer=lambda j: keras.optimizers.SGD(0.05))
    assert np.isfinite(history.history["loss"][0])
    assert len(model.weights) == weights_before  # the parts are not the model's
    recorded = json.loads((tmp_path / "run" / "fit.json").read_text())["objective"]
    assert recorded == {"name": "infopro_contrast", "first": [4.0, 0.0], "last": [1.0, 1.0],
                        "decoder_width": 12, "dim": 128, "temperature": 0.07}
    # Resuming with another objective is refused by name, before any work.
    with pytest.raises(ValueError, match=r"differs from the one in .* in \['objective'"):
        kgreedy.fit(net, ds, ds, epochs_per_stage=1, mode="decoupled", verbose=0,
                    run_dir=tmp_path / "run", resume=True, objective="infopro",
                    optimizer=lambda j: keras.optimizers.SGD(0.05))
    # fit(objective=...) gives the net the new objective's fresh parts.
    kgreedy.fit(net, ds, epochs_per_stage=1, verbose=0, objective="cross_entropy")
    assert net.parts == [{}, {}, {}] and net.objective.name == "cross_entropy"


@pytest.mark.parametrize("kwargs,fragment", [
    ({"objective": "infopro_contrastive"}, "Received: objective='infopro_contrastive'"),
    ({"objective_weights": ((1, 0), (0, 1))}, "only applies to 'infopro'"),
    ({"objective": "infopro", "objective_weights": ((1, float("nan")), (0, 1))},
     "Received: objective_weights=((1, nan), (0, 1))"),
    ({"objective": "infopro", "objective_weights": (1, 2)}, "Received: objective_weights=(1, 2)"),
    ({"pixel_max": 0}, "Received: pixel_max=0"),
    ({"pixel_max": float("inf")}, "Received: pixel_max=inf"),
])
def test_split_refuses_a_bad_objective_argument_by_name(kwargs, fragment):
    import kgreedy
    with pytest.raises(ValueError, match=re.escape(fragment)):
        kgreedy.split(_small_model(), at=["stem", "mid"], num_classes=10, **kwargs)
