"""The tuner on a model split into modules: a trial of N stages builds and trains the
first N modules of the whole model's split, the per-stage search reuses the best
trunk's modules, and a model that cannot be split stops before anything is written."""

import contextlib
import dataclasses
import io
import json
import os

import keras
import numpy as np
import pytest

from kgreedy import cli, tune
from kgreedy.config.designs import HeadDesign
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.config.tune_recipe import tune_recipe_from_dict
from kgreedy.model.from_recipe import from_recipe
from kgreedy.model.head_layers import AuxHead
from kgreedy.model.split import layer_span
from kgreedy.tuning.search import Search
from kgreedy.tuning.space import candidate_recipe, pool_problem, stage_sides, trial_recipe

SHAPE = (8, 8, 1)  # digits
TRAIN = {"epochs_per_stage": 1, "batch_size": 32, "steps_per_epoch": 2,
         "steps_per_execution": 2, "eval_batch_size": 360}
RESNET = {"name": "res", "seed": 0, "model": {"architecture": "resnet20", "modules": 3},
          "aux": {"k": 1, "width": "auto", "pool_size": 1, "last_head": "model"},
          "train": TRAIN, "export": {"enabled": False}}
SPACE = {"head": ["conv", "linear"], "k": [2], "width": None, "pool_size": [1, 2],
         "learning_rate": None}


def tiny_residual(path):
    """A two-module residual model with its own classifier, saved as .keras: the
    skip spans c2, so it splits at r1 or r2 only."""
    inputs = keras.Input(SHAPE)
    x = keras.layers.ReLU(name="r1")(keras.layers.Conv2D(4, 3, padding="same",
                                                         name="c1")(inputs))
    y = keras.layers.Conv2D(4, 3, padding="same", name="c2")(x)
    x = keras.layers.ReLU(name="r2")(keras.layers.Add(name="add")([x, y]))
    x = keras.layers.ReLU(name="r3")(keras.layers.Conv2D(8, 3, strides=2, padding="same",
                                                         name="c3")(x))
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    keras.Model(inputs, keras.layers.Dense(10, name="fc")(x)).save(path)
    return str(path)


def keras_file_base(path, **model):
    return {**RESNET, "name": "tiny_file",
            "model": {"keras_file": tiny_residual(path), "split_at": ["r2"], **model}}


def spans(net):
    return [layer_span(m) for m in net.modules]


def tune_of(base, **keys):
    return tune_recipe_from_dict({"name": "tune_split", "base": base, "search": SPACE,
                                  "max_trials": 1, "epochs_per_trial": 1, **keys})


def test_a_trial_trains_the_first_modules_of_the_whole_split(tmp_path):
    tuned = tune_of(RESNET, scope="per_stage", stages=2)
    candidate = candidate_recipe(tuned, [HeadDesign("conv", 2, "auto", 2)])
    # A per_stage width of "auto" stays aux.width's: each module's own channels.
    assert candidate.aux.per_stage[0].width is None
    whole = from_recipe(candidate, SHAPE, 10, [0.0], [1.0])
    for stages in (1, 2):
        trial = trial_recipe(tuned, candidate, stages)
        assert trial.model == candidate.model and not trial.export.enabled
        net = from_recipe(trial, SHAPE, 10, [0.0], [1.0], stages=stages)
        # The same layers as modules 1..stages of the whole model, not a new split of
        # the first layers into `stages` modules.
        assert spans(net) == spans(whole)[:stages]
        assert net.stage_shapes == whole.stage_shapes[:stages]
        assert isinstance(net.heads[-1], AuxHead)  # not the model's own classifier
    assert isinstance(whole.heads[-1], keras.Model)  # the last stage's is
    assert stage_sides(candidate, SHAPE, 10) == [8, 4, 2]

    # split_at: a trial of stage 1 of 2 ends at the split point, not at the trunk's end.
    base = recipe_from_dict(keras_file_base(tmp_path / "tiny.keras"))
    whole = from_recipe(base, SHAPE, 10, [0.0], [1.0])
    first = from_recipe(trial_recipe(tune_of(base.to_dict(), stages=1),
                                     base, 1), SHAPE, 10, [0.0], [1.0], stages=1)
    assert spans(first) == spans(whole)[:1] == [("c1", "r2", 5)]
    assert stage_sides(base, SHAPE, 10) == [8, 4]


def test_pool_check_of_a_split_model_uses_its_feature_maps():
    recipe = recipe_from_dict(RESNET)
    sides = stage_sides(recipe, SHAPE, 10)
    wide = dataclasses.replace(recipe, aux=dataclasses.replace(recipe.aux, pool_size=8))
    assert pool_problem(wide, sides, 1, 1) is None  # 8x8
    assert pool_problem(wide, sides, 1, 3) == ("aux.pool_size 8 is larger than the 4x4 "
                                               "feature map of stage 2")
    # The last stage is the model's own classifier: no pool of the recipe's.
    assert pool_problem(wide, sides, 3, 3) is None


def run_tune(argv, monkeypatch, calls):
    """Runs the tune CLI in this process, recording each trained stage."""
    real = Search.train_stage

    def spy(search, net, stage, recipe, start, end, cache, on_epoch):
        trunk = search.trunk_net
        calls.append({
            "search": search.name, "stage": stage, "spans": spans(net),
            "trunk_reused": None if trunk is None else all(
                np.array_equal(a, b) for m, t in zip(net.modules, trunk.modules)
                for a, b in zip(m.get_weights(), t.get_weights())),
            "trunk_modules": None if trunk is None else len(trunk.modules)})
        return real(search, net, stage, recipe, start, end, cache, on_epoch)

    monkeypatch.setattr(Search, "train_stage", spy)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.run(tune.main, argv)
    return status, out.getvalue()


def write_tune(folder, base, **keys):
    path = folder / "tune.json"
    path.write_text(json.dumps({"name": "tune_split", "base": base, "search": SPACE,
                                "tuner": "random", "max_trials": 1,
                                "epochs_per_trial": 1, **keys}))
    return str(path)


@pytest.mark.slow
def test_per_stage_search_of_a_split_resnet_reuses_the_best_trunk(tmp_path, monkeypatch):
    calls, output = [], tmp_path / "out"
    recipe = write_tune(tmp_path, RESNET, scope="per_stage", stages=2)
    status, _ = run_tune([recipe, "--output", str(output)], monkeypatch, calls)
    assert status == 0
    whole = spans(from_recipe(recipe_from_dict(RESNET), SHAPE, 10, [0.0], [1.0]))
    assert [(c["search"], c["stage"]) for c in calls] == [("stage1", 1), ("stage2", 2)]
    assert calls[0]["spans"] == whole[:1] and calls[1]["spans"] == whole[:2]
    # Stage 2 trains on the stage-1 search's best module 1, weights and all.
    assert calls[0]["trunk_reused"] is None
    assert calls[1]["trunk_modules"] == 1 and calls[1]["trunk_reused"] is True
    results = json.loads((output / "tuning.json").read_text())
    assert [r["status"] for r in results["trials"]] == ["COMPLETED"] * 2
    best = json.loads((output / "best_recipe.json").read_text())
    assert best["model"]["architecture"] == "resnet20" and best["model"]["modules"] == 3
    assert best["aux"]["last_head"] == "model" and len(best["aux"]["per_stage"]) == 2
    # The best recipe builds the whole model: three modules, ResNet-20's own classifier.
    net = from_recipe(recipe_from_dict(best), SHAPE, 10, [0.0], [1.0])
    assert spans(net) == whole and isinstance(net.heads[-1], keras.Model)


def test_joint_search_of_a_keras_file_split_at(tmp_path, monkeypatch):
    calls, output = [], tmp_path / "out"
    base = keras_file_base(tmp_path / "tiny.keras")
    recipe = write_tune(tmp_path, base, scope="joint", stages=1)
    status, stdout = run_tune([recipe, "--output", str(output)], monkeypatch, calls)
    assert status == 0, stdout
    assert [(c["stage"], c["spans"]) for c in calls] == [(1, [("c1", "r2", 5)])]
    best = json.loads((output / "best_recipe.json").read_text())
    assert best["model"]["split_at"] == ["r2"] and best["model"]["keras_file"]


def test_a_model_that_cannot_be_split_writes_nothing(tmp_path, monkeypatch, capsys):
    base = keras_file_base(tmp_path / "tiny.keras", split_at=["c2"])  # the skip spans c2
    recipe, output = write_tune(tmp_path, base), tmp_path / "out"
    with pytest.raises(SystemExit) as caught:
        run_tune([recipe, "--output", str(output)], monkeypatch, [])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kgreedy: error: ") and err.count("\n") == 1, err
    assert "'c2' is not a split point" in err
    assert not os.path.exists(output)
