"""The tuner searches the local objective (`search.aux_objective`) and InfoPro's
weights (`search.objective_weights`), issue 26: declared once per recipe like the
learning rate, the weights only for an infopro objective, and written into every
trial's recipe, tuning.json and best_recipe.json."""

import contextlib
import io
import json
import os

import keras_tuner
import pytest

from kgreedy import cli, train, tune
from kgreedy.base.errors import RecipeError
from kgreedy.config.recipe import ObjectiveWeightsConfig, load_recipe
from kgreedy.config.tune_recipe import tune_recipe_from_dict
from kgreedy.tuning.search import Search
from kgreedy.tuning.space import (candidate_recipe, declare, decode_weights, design_from,
                                  encode_weights, objective_from)

BASE = {"name": "tiny", "seed": 0,
        "model": {"blocks": [{"width": 4}, {"width": 8, "downsample": "psi"}]},
        "aux": {"k": 2, "width": 4},
        "train": {"epochs_per_stage": 1, "batch_size": 32, "steps_per_epoch": 3,
                  "steps_per_execution": 3},
        "export": {"enabled": False}}
WEIGHTS = {"first": [1, 0.5], "last": [0.25, 2]}
SPACE = {"head": ["conv"], "k": [2], "width": None, "pool_size": [1], "learning_rate": None,
         "aux_objective": ["cross_entropy", "infopro_contrast"],
         "objective_weights": [WEIGHTS]}


def tune_of(search=SPACE, base=BASE, **keys):
    return tune_recipe_from_dict({"name": "tune_objective", "base": base, "search": search,
                                  "tuner": "random", "max_trials": 2, "stages": 2,
                                  "epochs_per_trial": 1, **keys})


def declared(tune, stage=1, values=None):
    """The hyperparameters `declare` makes, with `values` drawn for them."""
    hp = keras_tuner.HyperParameters()
    if values:
        hp.values.update(values)
    declare(hp, tune, stage)
    return hp


def test_weights_choices_are_readable_strings_that_read_back():
    weights = ObjectiveWeightsConfig(first=(6.0, 0.0), last=(0.1, 2.5))
    assert encode_weights(weights) == "6,0>0.1,2.5"
    assert decode_weights("6,0>0.1,2.5") == weights
    with pytest.raises(ValueError, match=r"Received: '6,0>1'"):
        decode_weights("6,0>1")


def test_the_weights_exist_only_for_an_infopro_objective():
    tuned = tune_of()
    hp = declared(tuned, values={"aux_objective": "cross_entropy"})
    assert "objective_weights" not in hp.values
    assert objective_from(hp.values, tuned) == ("cross_entropy", None)
    hp = declared(tuned, values={"aux_objective": "infopro_contrast"})
    assert hp.values["objective_weights"] == "1,0.5>0.25,2"
    local = objective_from(hp.values, tuned)
    assert local == ("infopro_contrast", {"first": [1.0, 0.5], "last": [0.25, 2.0]})
    candidate = candidate_recipe(tuned, [design_from(hp.values, tuned)],
                                 local_objective=local)
    assert candidate.aux.objective == "infopro_contrast"
    assert candidate.aux.objective_weights == decode_weights("1,0.5>0.25,2")


def test_unsearched_keys_keep_the_base_objective():
    base = {**BASE, "aux": {**BASE["aux"], "objective": "infopro",
                            "objective_weights": WEIGHTS}}
    # Neither searched: no hyperparameter, the base's objective and weights.
    tuned = tune_of({"head": ["conv"]}, base)
    hp = declared(tuned)
    assert not {"aux_objective", "objective_weights"} & set(hp.values)
    assert objective_from(hp.values, tuned) == ("infopro", {"first": [1.0, 0.5],
                                                            "last": [0.25, 2.0]})
    # Weights searched for the base's infopro objective: declared without a condition.
    tuned = tune_of({"objective_weights": [{"first": [3, 1], "last": [0, 1]}]}, base)
    assert objective_from(declared(tuned).values, tuned) == (
        "infopro", {"first": [3.0, 1.0], "last": [0.0, 1.0]})
    # An infopro objective drawn with no weights searched: the base's (None: default).
    tuned = tune_of({"aux_objective": ["infopro_contrast"]})
    assert objective_from(declared(tuned).values, tuned) == ("infopro_contrast", None)


def test_per_stage_searches_the_objective_with_stage_1_only():
    tuned = tune_of(scope="per_stage")
    assert {"aux_objective"} <= set(declared(tuned, 1).values)
    assert not {"aux_objective", "objective_weights"} & set(declared(tuned, 2).values)


@pytest.mark.parametrize("search,expected", [
    ({"aux_objective": []}, "search.aux_objective: needs at least one value"),
    ({"aux_objective": ["infopro", "infopro_pro"]},
     "search.aux_objective[1]: must be one of 'cross_entropy', 'infopro', "
     "'infopro_contrast'; received 'infopro_pro'"),
    ({"aux_objective": ["infopro", "infopro"]}, "search.aux_objective: has a value twice"),
    ({"aux_objective": ["infopro"], "objective_weights": []},
     "search.objective_weights: needs at least one value"),
    ({"aux_objective": ["infopro"],
      "objective_weights": [WEIGHTS, {"first": [1, -1], "last": [1, 1]}]},
     "search.objective_weights[1].first: must be two finite weights >= 0, [w_rec, w_task]; "
     "received [1.0, -1.0]"),
    ({"aux_objective": ["infopro"], "objective_weights": [{"first": [1], "last": [1, 1]}]},
     "search.objective_weights[0].first: must be two finite weights >= 0"),
    ({"aux_objective": ["infopro"], "objective_weights": [{"first": [1, 1]}]},
     "search.objective_weights[0].last: is required"),
    ({"aux_objective": ["infopro"], "objective_weights": [WEIGHTS, WEIGHTS]},
     "search.objective_weights: has a value twice"),
    ({"aux_objective": ["cross_entropy"], "objective_weights": [WEIGHTS]},
     "search.objective_weights: only applies to aux.objective 'infopro' or "
     "'infopro_contrast'"),
    ({"objective_weights": [WEIGHTS]},  # the base's objective is cross_entropy
     "every objective the search can pick is 'cross_entropy'"),
])
def test_bad_objective_choices_exit_2_naming_the_key(tmp_path, capsys, search, expected):
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"name": "tune_objective", "base": BASE, "search": search}))
    with pytest.raises(SystemExit) as e:
        cli.run(tune.main, [str(path), "--output", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kgreedy: error: ") and "\n" not in err
    assert expected in err
    assert not os.path.exists(tmp_path / "out")


def test_an_infopro_choice_with_the_feature_cache_on_is_refused():
    base = {**BASE, "train": {**BASE["train"], "cache_features": "on"}}
    with pytest.raises(RecipeError, match=r"search\.aux_objective\[1\]: 'infopro_contrast' "
                                          r"cannot run with base\.train\.cache_features"):
        tune_of(base=base)


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
def test_a_search_over_the_objective_records_it_and_its_best_recipe_trains(
        tmp_path, monkeypatch):
    folder = tmp_path / "tune"
    folder.mkdir()
    path = folder / "tune.json"
    path.write_text(json.dumps(tune_of().to_dict()))
    trained = []  # (stage, aux.objective, aux.objective_weights) of each trained stage
    real = Search.train_stage

    def spy(search, net, stage, recipe, *args):
        trained.append((stage, recipe.aux.objective, recipe.aux.objective_weights))
        return real(search, net, stage, recipe, *args)

    monkeypatch.setattr(Search, "train_stage", spy)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.run(tune.main, [str(path), "--output", str(tmp_path / "out")])
    stdout = out.getvalue()
    assert status == 0, stdout
    results = load(tmp_path / "out" / "tuning.json")
    rows = {r["aux_objective"]: r for r in results["trials"]}
    # The space holds two trials: one of each objective, the weights only with infopro.
    assert sorted(rows) == ["cross_entropy", "infopro_contrast"]
    assert all(r["status"] == "COMPLETED" for r in rows.values())
    assert rows["cross_entropy"]["objective_weights"] is None
    assert "objective_weights" not in rows["cross_entropy"]["hyperparameters"]
    weights = {"first": [1.0, 0.5], "last": [0.25, 2.0]}
    assert rows["infopro_contrast"]["objective_weights"] == weights
    assert rows["infopro_contrast"]["hyperparameters"]["objective_weights"] == "1,0.5>0.25,2"
    # Each trial trained both stages with its own objective.
    assert sorted(trained, key=str) == sorted(
        [(1, "cross_entropy", None), (2, "cross_entropy", None)]
        + [(j, "infopro_contrast", decode_weights("1,0.5>0.25,2")) for j in (1, 2)], key=str)
    # The table shows them.
    assert "aux.objective    weights" in stdout
    assert any("infopro_contrast 1,0.5>0.25,2" in line for line in stdout.splitlines())

    best = results["best"][0]
    recipe = load_recipe(str(tmp_path / "out" / "best_recipe.json"))
    assert recipe.aux.objective == best["aux_objective"]
    assert recipe.aux.objective_weights == (
        None if best["objective_weights"] is None
        else ObjectiveWeightsConfig(first=(1.0, 0.5), last=(0.25, 2.0)))
    assert f"aux.objective {best['aux_objective']}" in recipe.description
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.run(train.main, [str(tmp_path / "out" / "best_recipe.json"),
                                      "--output", str(tmp_path / "run"),
                                      "--set", "train.steps_per_epoch=2"])
    assert status == 0, out.getvalue()
    assert load(tmp_path / "run" / "summary.json")["final"]["stage"] == 2


@pytest.mark.slow
def test_per_stage_draws_the_objective_with_stage_1_and_keeps_it(tmp_path):
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(tune_of(scope="per_stage").to_dict()))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.run(tune.main, [str(path), "--output", str(tmp_path / "out")])
    assert status == 0, out.getvalue()
    results = load(tmp_path / "out" / "tuning.json")
    best = {b["search"]: b for b in results["best"]}
    stage1 = [r for r in results["trials"] if r["search"] == "stage1"]
    stage2 = [r for r in results["trials"] if r["search"] == "stage2"]
    assert sorted(r["aux_objective"] for r in stage1) == ["cross_entropy", "infopro_contrast"]
    # Stage 2 draws no objective: its trials train with stage 1's best (a space of one
    # design, so one trial).
    chosen = (best["stage1"]["aux_objective"], best["stage1"]["objective_weights"])
    assert len(stage2) == 1 and (stage2[0]["aux_objective"],
                                 stage2[0]["objective_weights"]) == chosen
    assert not {"aux_objective", "objective_weights"} & set(stage2[0]["hyperparameters"])
    context = load(tmp_path / "out" / "tuner" / "stage2" / "kgreedy_context.json")
    assert (context["aux_objective"], context["objective_weights"]) == chosen
    recipe = load_recipe(str(tmp_path / "out" / "best_recipe.json"))
    assert recipe.aux.objective == chosen[0] and len(recipe.aux.per_stage) == 2
