"""keras-tuner search over the auxiliary design (`python -m kgreedy.tune`)."""

import contextlib
import errno
import io
import json
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from kgreedy import cli, train, tune
from kgreedy.base.errors import SearchFailed, TrainingStopped
from kgreedy.config.designs import HeadDesign
from kgreedy.config.recipe import load_recipe
from kgreedy.config.tune_recipe import load_tune_recipe, tune_recipe_from_dict
from kgreedy.model.from_recipe import from_recipe
from kgreedy.tuning import runner, search, space
from kgreedy.tuning.search import Search

ROOT = str(next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file()))
BASE = {"name": "tiny", "seed": 0,
        "model": {"blocks": [{"width": 4}, {"width": 8, "downsample": "psi"}]},
        "aux": {"k": 2, "width": 4},
        # cache_features on: the tests follow the trials' use of the shared feature
        # cache, which auto leaves off for this one-conv prefix (too cheap to pay).
        "train": {"epochs_per_stage": 1, "batch_size": 32, "steps_per_epoch": 3,
                  "steps_per_execution": 3, "cache_features": "on"},
        "export": {"enabled": False}}
SPACE = {"head": ["conv", "linear"], "k": [1, 2], "width": None, "pool_size": [1, 2],
         "learning_rate": {"min": 0.01, "max": 0.1}}


def write_recipes(folder, base=BASE, **tune_keys):
    """A base recipe file and a tune recipe that names it by a relative path."""
    os.makedirs(folder / "recipes", exist_ok=True)
    (folder / "recipes" / "base.json").write_text(json.dumps(base))
    recipe = {"name": "tune_tiny", "base": "base.json", "search": SPACE,
              "tuner": "random", "max_trials": 3, "scope": "joint", "stages": 2,
              "epochs_per_trial": 1, **tune_keys}
    path = folder / "recipes" / "tune.json"
    path.write_text(json.dumps(recipe))
    return str(path)


class StageSpy:
    """Wraps `Search.train_stage`: records each call, can stop at the n-th one."""

    def __init__(self, stop_at=None):
        self.calls = []
        self.stop_at = stop_at

    def install(self, monkeypatch):
        real = Search.train_stage

        def spy(search, net, stage, recipe, start, end, cache, on_epoch):
            self.calls.append({"search": search.name, "stage": stage, "start": start,
                               "end": end, "cached": cache is not None})
            if len(self.calls) == self.stop_at:
                raise KeyboardInterrupt("simulated stop")
            return real(search, net, stage, recipe, start, end, cache, on_epoch)

        monkeypatch.setattr(Search, "train_stage", spy)
        return self


def run_tune(argv, spy=None):
    """Runs the tune CLI in this process; returns (exit status, stdout, spy)."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        spy = (spy or StageSpy()).install(mp)
        status = cli.run(tune.main, argv)
    return status, out.getvalue(), spy


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    """A 3-trial random search stopped in its 2nd trial, resumed, rerun, extended."""
    folder = tmp_path_factory.mktemp("joint")
    recipe, output = write_recipes(folder), str(folder / "out")
    argv = [recipe, "--output", output]
    # Trial 0 trains 2 stages; trial 1 is interrupted (Ctrl-C: status 130) at once.
    assert run_tune(argv, StageSpy(stop_at=3))[0] == 130
    first = (folder / "out" / "tuner" / "joint" / "trial_0" / "kgreedy.json").read_text()
    resumed = run_tune(argv)
    rerun = run_tune(argv)
    results = load(os.path.join(output, "tuning.json"))
    best_recipe = os.path.join(output, "best_recipe.json")
    best_before_extension = load(best_recipe)
    extended = run_tune(argv + ["--set", "max_trials=4"])
    return {"folder": folder, "output": output, "first": first, "resumed": resumed,
            "rerun": rerun, "extended": extended, "results": results,
            "best_recipe": best_before_extension}


@pytest.mark.slow
def test_random_search_finishes_and_its_best_recipe_trains(joint, tmp_path):
    status, stdout, _ = joint["resumed"]
    assert status == 0
    results = joint["results"]
    assert (results["tuner"], results["scope"], results["stages"]) == ("random", "joint", 2)
    rows = results["trials"]
    assert sorted(r["trial_id"] for r in rows) == ["0", "1", "2"]
    assert all(r["status"] == "COMPLETED" for r in rows)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)  # sorted by score, best first
    for r in rows:
        assert r["score"] == r["metrics"]["val_accuracy"] and 0 <= r["score"] <= 1
        assert set(r["hyperparameters"]) >= {"head", "pool_size", "learning_rate"}
        assert r["design"]["head"] == r["hyperparameters"]["head"]
        assert r["deployed_params"] > r["head_params"] > 0 and r["trainable_params"] > 0
        assert r["seconds"] > 0 and r["epochs"] == 1
        assert os.path.isfile(os.path.join(joint["output"], "tuner", "joint",
                                           f"trial_{r['trial_id']}", "checkpoint.weights.h5"))
    assert results["best"][0]["trial_id"] == rows[0]["trial_id"]
    # The printed table has one line per trial.
    assert "search   trial  status" in stdout
    assert sum(line.startswith("joint ") for line in stdout.splitlines()) == 2 + 3

    # best_recipe.json: a complete train recipe with the best design, for every stage.
    best = joint["best_recipe"]
    design, lr = results["best"][0]["design"], results["best"][0]["learning_rate"]
    recipe = load_recipe(os.path.join(joint["output"], "best_recipe.json"))
    assert recipe.name == "tune_tiny_best"
    assert (best["aux"]["head"], best["aux"]["pool_size"]) == (design["head"],
                                                               design["pool_size"])
    assert best["train"]["optimizer"]["learning_rate"] == pytest.approx(lr)
    assert best["train"]["epochs_per_stage"] == BASE["train"]["epochs_per_stage"]
    assert len(best["model"]["blocks"]) == 2 and best["aux"]["per_stage"] == []
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.run(train.main, [os.path.join(joint["output"], "best_recipe.json"),
                                      "--output", str(tmp_path / "run"),
                                      "--set", "train.steps_per_epoch=2"])
    assert status == 0, out.getvalue()
    summary = load(tmp_path / "run" / "summary.json")
    assert summary["final"]["stage"] == 2


@pytest.mark.slow
def test_resumed_search_skips_finished_trials(joint):
    _, stdout, spy = joint["resumed"]
    # Trial 0 finished before the stop: not trained again, its record untouched.
    assert "search joint: random, 1 trials done before" in stdout
    assert [(c["stage"], c["start"], c["end"]) for c in spy.calls] == [(1, 0, 1), (2, 0, 1)] * 2
    record = joint["folder"] / "out" / "tuner" / "joint" / "trial_0" / "kgreedy.json"
    assert record.read_text() == joint["first"]
    # Rerunning a finished search trains nothing.
    status, stdout, spy = joint["rerun"]
    assert status == 0 and spy.calls == [] and "3 trials done before" in stdout
    # Only max_trials may grow on resume: one more trial.
    status, _, spy = joint["extended"]
    assert status == 0 and len(spy.calls) == 2
    assert len(load(os.path.join(joint["output"], "tuning.json"))["trials"]) == 4


@pytest.mark.slow
def test_output_holding_another_search_is_refused(joint, capsys):
    recipe = os.path.join(joint["folder"], "recipes", "tune.json")
    with pytest.raises(SystemExit) as e:
        cli.run(tune.main, [recipe, "--output", joint["output"],
                            "--set", "epochs_per_trial=2"])
    assert e.value.code == 2
    assert re.search(r"--output: this tune recipe differs from the one in .* in "
                     r"\['epochs_per_trial'\]; only max_trials", capsys.readouterr().err)


@pytest.mark.slow
def test_invalid_combination_is_a_failed_trial(tmp_path):
    base = {**BASE, "model": {"blocks": [{"width": 4}, {"width": 4, "downsample": "psi"},
                                         {"width": 4, "downsample": "psi"}]}}
    recipe = write_recipes(tmp_path, base, stages=1, max_trials=2,
                           search={"head": ["linear"], "pool_size": [2, 4]})
    status, stdout, spy = run_tune([recipe, "--output", str(tmp_path / "out")])
    assert status == 0
    rows = {r["design"]["pool_size"]: r for r in load(tmp_path / "out" / "tuning.json")["trials"]}
    assert rows[2]["status"] == "COMPLETED" and rows[2]["message"] is None
    # Pool 4 fits stage 1's 8x8 map, but the best recipe would use it at stage 3 (2x2).
    assert rows[4]["status"] == "FAILED" and rows[4]["score"] is None
    assert "aux.pool_size 4 is larger than the 2x2 feature map of stage 3" in rows[4]["message"]
    assert "failed: aux.pool_size 4" in stdout
    assert len(spy.calls) == 1  # the failed trial trained nothing


def test_a_search_where_every_trial_fails_exits_1_with_one_line(tmp_path, capsys):
    base = {**BASE, "model": {"blocks": [{"width": 4}, {"width": 4, "downsample": "psi"},
                                         {"width": 4, "downsample": "psi"}]}}
    recipe = write_recipes(tmp_path, base, stages=1, max_trials=1,
                           search={"head": ["linear"], "pool_size": [4]})
    status, _, spy = run_tune([recipe, "--output", str(tmp_path / "out")])
    assert status == 1 and not spy.calls
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kgreedy: search joint: no trial completed")
    # A failed search is not a stopped training: it promises no checkpoint.
    assert not issubclass(SearchFailed, TrainingStopped)


class DiskFullSpy(StageSpy):
    """A trial's stage whose write finds the disk full."""

    def install(self, monkeypatch):
        def full(search, *args):
            self.calls.append(search.name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                          os.path.join(search.work_dir, "cache", "features"))

        monkeypatch.setattr(Search, "train_stage", full)
        return self


def test_a_full_disk_stops_the_search_at_once_with_its_own_line(tmp_path, capsys):
    recipe = write_recipes(tmp_path, max_trials=3)
    status, _, spy = run_tune([recipe, "--output", str(tmp_path / "out")], DiskFullSpy())
    # Not one failed trial after another: the first stops the search (exit 74).
    assert status == 74 and len(spy.calls) == 1
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("kgreedy: error: disk full: no space left on device writing "
                           f"{tmp_path / 'out' / 'cache' / 'features'} ("), line
    assert line.endswith("free space there, then run the same command again")
    assert "Traceback" not in err


@pytest.mark.parametrize("change,expected", [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"tuner": "grid"}, "tuner: must be one of 'random', 'hyperband', 'bayesian'"),
    ({"base": {**BASE, "aux": {"k": 0}}}, "base.aux.k: must be >= 1; received 0"),
    ({"base": "missing.json"}, "base: recipe file not found"),
    ({"search": {"head": ["conv", "mlp"]}}, "search.head[1]: must be one of"),
    ({"search": {"learning_rate": {"min": 0.5, "max": 0.1}}},
     "search.learning_rate.max: must be >= min"),
    ({"stages": 5}, "stages: must be <= the 2 stages of the base model; received 5"),
    ({"base": {**BASE, "aux": {"per_stage": [{"k": 1}]}}}, "base.aux.per_stage: must be empty"),
    ({"base": {**BASE, "model": {"blocks": [{"width": 4, "downsample": "psi"}] * 4}}},
     "base.model.blocks[2].downsample: the feature map is 1x1 after this block"),
    ({"scope": "per_stage", "base": {**BASE, "train": {"mode": "end_to_end"}}},
     "base.train.mode: must be 'greedy'"),
])
def test_bad_tune_recipe_exits_2_with_one_line(tmp_path, capsys, change, expected):
    path = write_recipes(tmp_path)
    recipe = {**load(path), **change}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(recipe, f)
    with pytest.raises(SystemExit) as e:
        cli.run(tune.main, [path, "--output", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kgreedy: error: ") and "\n" not in err
    assert expected in err
    assert not os.path.exists(tmp_path / "out")  # nothing written


def test_bad_override_and_bad_json_exit_2(tmp_path, capsys):
    path = write_recipes(tmp_path)
    for argv, expected in (([path, "--set", "max_trials"], "--set: expected KEY=VALUE"),
                           ([path, "--set", "base.train.batch_size=0"],
                            "base.train.batch_size: must be >= 1")):
        with pytest.raises(SystemExit) as e:
            cli.run(tune.main, argv)
        assert e.value.code == 2 and expected in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{\"name\": ")
    with pytest.raises(SystemExit):
        cli.run(tune.main, [str(tmp_path / "broken.json")])
    assert "not valid JSON" in capsys.readouterr().err


def test_a_trials_design_is_a_head_design():
    tuned = tune_recipe_from_dict({"name": "t", "base": BASE, "search": SPACE,
                                   "scope": "per_stage"})
    conv = space.design_from({"head": "conv", "k": 2, "width": 8, "pool_size": 1}, tuned)
    assert conv == HeadDesign("conv", 2, 8, 1)
    # linear: k 1 and the base's width, as tuning.json has always recorded them.
    linear = space.design_from({"head": "linear", "pool_size": 2}, tuned)
    assert linear.to_dict() == {"head": "linear", "k": 1, "width": 4, "pool_size": 2}
    recipe = space.candidate_recipe(tuned, [conv, linear])
    assert [(e.head, e.k, e.width, e.pool_size) for e in recipe.aux.per_stage] == [
        ("conv", 2, 8, 1), ("linear", 1, 8, 2)]  # widths as trained: x2 after psi
    for bad in ([conv.to_dict()], [conv, {"head": "linear", "pool_size": 2}]):
        with pytest.raises(ValueError, match="must be a HeadDesign"):
            space.candidate_recipe(tuned, bad)


class RecipeSpy:
    """Records the designs each caller of `candidate_recipe` (a trial's build in
    `search`, the best recipe in `runner`) hands it."""

    def __init__(self, monkeypatch):
        self.calls = {"search": [], "runner": []}
        for module in (search, runner):
            def spy(tune, designs, *args, _name=module.__name__.split(".")[-1], **kwargs):
                self.calls[_name].append(list(designs))
                return space.candidate_recipe(tune, designs, *args, **kwargs)

            monkeypatch.setattr(module, "candidate_recipe", spy)


@pytest.mark.slow
def test_per_stage_scope_picks_a_design_per_stage(tmp_path, monkeypatch):
    recipe = write_recipes(tmp_path, scope="per_stage", max_trials=2)
    designs = RecipeSpy(monkeypatch)
    status, stdout, spy = run_tune([recipe, "--output", str(tmp_path / "out")])
    assert status == 0
    results = load(tmp_path / "out" / "tuning.json")
    best = {b["search"]: b for b in results["best"]}
    assert sorted(best) == ["stage1", "stage2"]
    # Trials and the best recipe hand HeadDesigns to the recipe builder, and
    # tuning.json's designs (their to_dict, {head, k, width, pool_size}) read back
    # as the same HeadDesigns: a trial's own, the fixed stage 1 of stage 2's trials.
    built = designs.calls["search"]
    assert built and all(isinstance(d, HeadDesign) for call in built for d in call)
    chosen = [HeadDesign.from_dict(best[f"stage{j}"]["design"]) for j in (1, 2)]
    for r in results["trials"]:
        design = HeadDesign.from_dict(r["design"])
        assert design.to_dict() == r["design"]
        assert list(r["design"]) == ["head", "k", "width", "pool_size"]
        assert [*chosen[:r["stage"] - 1], design] in built
    assert designs.calls["runner"] == [chosen]
    # Stage 2 is searched on top of stage 1's best trunk, with stage 1's learning rate,
    # training stage 2 alone on the trunk's cached features.
    assert [c["stage"] for c in spy.calls if c["search"] == "stage2"] == [2, 2]
    assert all(c["cached"] for c in spy.calls if c["search"] == "stage2")
    lr = best["stage1"]["learning_rate"]
    stage2 = [r for r in results["trials"] if r["search"] == "stage2"]
    assert all(r["learning_rate"] == lr and "learning_rate" not in r["hyperparameters"]
               for r in stage2)
    tuner_dir = tmp_path / "out" / "tuner"
    key = "layers/conv_block/conv/vars/0"  # block 1's kernel
    with h5py.File(tuner_dir / "stage1" / f"trial_{best['stage1']['trial_id']}"
                   / "checkpoint.weights.h5") as f:
        trunk = f[key][()]
    for r in stage2:
        with h5py.File(tuner_dir / "stage2" / f"trial_{r['trial_id']}"
                       / "checkpoint.weights.h5") as f:
            np.testing.assert_array_equal(f[key][()], trunk)
    # best_recipe.json gives each stage its own design (widths as trained: x2 after psi).
    best_recipe = load_recipe(str(tmp_path / "out" / "best_recipe.json"))
    for j, entry in enumerate(best_recipe.aux.per_stage, start=1):
        design = best[f"stage{j}"]["design"]
        assert (entry.head, entry.k, entry.pool_size) == (design["head"], design["k"],
                                                          design["pool_size"])
        assert entry.width == design["width"] * j
    assert len(best_recipe.aux.per_stage) == 2
    assert best_recipe.train.optimizer.learning_rate == pytest.approx(lr)
    net = from_recipe(best_recipe, (8, 8, 1), 10, [0.0], [1.0])
    kinds = {"conv": "AuxHead", "mlp_sr": "MlpSrHead", "linear": "LinearHead"}
    assert [type(h).__name__ for h in net.heads] == [
        kinds[best[f"stage{j}"]["design"]["head"]] for j in (1, 2)]

    # Resumed with stage 1's best changed (here: its record says another trial): stage 2
    # was searched on another trunk, so it is moved aside and searched again.
    context_path = tuner_dir / "stage2" / "kgreedy_context.json"
    context = load(context_path)
    context["best_trial"] = "other"
    context_path.write_text(json.dumps(context))
    status, stdout, spy = run_tune([recipe, "--output", str(tmp_path / "out")])
    assert status == 0
    assert [c["search"] for c in spy.calls] == ["stage2", "stage2"]
    assert (tuner_dir / "stage2.superseded-1" / "trial_0").is_dir()
    assert load(context_path)["best_trial"] == best["stage1"]["trial_id"]


@pytest.mark.slow
def test_hyperband_continues_trials_from_their_epoch(tmp_path):
    recipe = write_recipes(tmp_path, tuner="hyperband", stages=2, epochs_per_trial=2,
                           hyperband_factor=2, search={**SPACE, "pool_size": [2]})
    status, stdout, spy = run_tune([recipe, "--output", str(tmp_path / "out")])
    assert status == 0
    rows = load(tmp_path / "out" / "tuning.json")["trials"]
    continued = [r for r in rows if r["continues"] is not None]
    assert continued and all(r["epochs"] == 1 for r in continued)
    assert "(continues trial" in stdout
    # A continued trial loads the earlier trial's weights: stage 1 is not trained again
    # and stage 2 goes on from epoch 1 to 2.
    assert {"search": "joint", "stage": 2, "start": 1, "end": 2, "cached": True} in spy.calls
    assert not any(c["stage"] == 1 and c["start"] for c in spy.calls)
    assert all(c["end"] in (1, 2) for c in spy.calls)


def test_shipped_tune_recipes_load():
    digits = load_tune_recipe(os.path.join(ROOT, "recipes", "tune", "aux_digits.json"))
    assert digits.base.name == "quickstart" and digits.scope == "joint"
    cifar = load_tune_recipe(os.path.join(ROOT, "recipes", "tune", "aux_cifar10.json"))
    assert cifar.base.name == "cifar10_k2" and cifar.scope == "per_stage"
    assert cifar.tuner == "hyperband" and cifar.num_stages == 4
