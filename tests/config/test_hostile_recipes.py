"""Hostile recipes (issue 25, defects 8, 9 and 10): every JSON kgreedy reads from a
user is read strictly (`kgreedy.base.files.loads`) and every number is checked finite
and in range, so a bad recipe, `--set` value, tune recipe, recipe.json or fit.json is
one `kgreedy: error:` line with exit status 2 and nothing written: never a traceback,
a silently last-wins duplicate key, NaN in a run, or a run named with a newline."""

import json
import math
import os

import pytest

from kgreedy import cli
from kgreedy import train as train_cli
from kgreedy.base import files
from kgreedy.base.errors import KgreedyError, RecipeError
from kgreedy.config.recipe import load_recipe, recipe_from_dict
from kgreedy.config.tune_recipe import load_tune_recipe, tune_recipe_from_dict

BASE = {
    "name": "tiny_digits",
    "data": {"source": "digits"},
    "model": {"blocks": [{"width": 4}, {"width": 8, "downsample": "psi"}],
              "batch_norm": False},
    "aux": {"k": 1, "width": 4},
    "train": {"epochs_per_stage": 1, "batch_size": 32, "steps_per_epoch": 2},
    "export": {"enabled": False},
}
BASE_TEXT = json.dumps(BASE)
DIGITS = "9" * 5000  # past Python's 4,300-digit limit on int("...")


def with_key(text, section, addition):
    """BASE's JSON text with `addition` (raw JSON text) first in object `section`."""
    marker = f'"{section}": {{'
    assert marker in text
    return text.replace(marker, marker + addition + ", ", 1)


# (id, recipe file text (bytes: written as they are), --set values,
#  fragments of the one error line; "{recipe}" is the file's path)
CASES = [
    ("deep-nesting", "[" * 100_000 + "]" * 100_000, [],
     ["{recipe}: nested deeper than 100 levels", "received '[[[[", "...'"]),
    ("nesting-101", "[" * 101 + "]" * 101, [], ["nested deeper than 100 levels"]),
    ("not-utf8", BASE_TEXT.replace('"tiny_digits"', '"caf\xe9"').encode("latin-1"), [],
     ["{recipe}: recipe file is not UTF-8 text (byte 0xe9 at offset"]),
    ("int-5000-digits-in-file", BASE_TEXT[:-1] + f', "seed": {DIGITS}}}', [],
     ["{recipe}: seed: an integer of 5000 digits is too long", "received '9999", "...'"]),
    ("int-5000-digits-in-set", BASE_TEXT, ["--set", f"seed={DIGITS}"],
     ["--set: seed: an integer of 5000 digits", "...'"]),
    ("seed-above-2**32-1", BASE_TEXT[:-1] + f', "seed": {2**32}}}', [],
     ["seed: must be <= 4294967295; received 4294967296"]),
    ("eval-fraction-nan", with_key(BASE_TEXT, "data", '"eval_fraction": NaN'), [],
     ["{recipe}: data.eval_fraction: NaN is not a JSON number", "received 'NaN'"]),
    ("learning-rate-infinity", with_key(BASE_TEXT, "train",
                                        '"optimizer": {"learning_rate": Infinity}'), [],
     ["train.optimizer.learning_rate: Infinity is not a JSON number"]),
    ("weight-decay-1e400", with_key(BASE_TEXT, "train",
                                    '"optimizer": {"weight_decay": 1e400}'), [],
     ["train.optimizer.weight_decay: the number is too large to be finite",
      "received '1e400'"]),
    ("std-infinity", with_key(BASE_TEXT, "data", '"std": [Infinity]'), [],
     ["data.std[0]: Infinity is not a JSON number"]),
    ("mean-minus-infinity", with_key(BASE_TEXT, "data", '"mean": [-Infinity]'), [],
     ["data.mean[0]: -Infinity is not a JSON number"]),
    ("set-learning-rate-nan", BASE_TEXT, ["--set", "train.optimizer.learning_rate=NaN"],
     ["--set: train.optimizer.learning_rate: NaN is not a JSON number"]),
    ("set-std-1e400", BASE_TEXT, ["--set", "data.std=[1e400]"],
     ["--set: data.std[0]: the number is too large to be finite"]),
    ("set-mean-nested-nan", BASE_TEXT, ["--set", 'data={"mean": [NaN]}'],
     ["--set: data.mean[0]: NaN is not a JSON number"]),
    ("duplicate-key-top", BASE_TEXT[:-1] + ', "seed": 1, "seed": 2}', [],
     ["{recipe}: the key 'seed' appears twice"]),
    ("duplicate-key-nested", with_key(BASE_TEXT, "train",
                                      '"batch_size": 16'), [],
     ["{recipe}: train: the key 'batch_size' appears twice"]),
    ("set-duplicate-key", BASE_TEXT, ["--set", 'aux={"k": 1, "k": 2}'],
     ["--set: aux: the key 'k' appears twice"]),
    ("set-key-too-deep", BASE_TEXT, ["--set", "a" + ".a" * 150 + "=1"],
     ["--set: KEY is nested deeper than 100 levels"]),
    ("name-trailing-newline", BASE_TEXT, ["--set", "name=nl\n"],
     ["name: must be letters, digits", r"received 'nl\n'"]),
    ("model-name-trailing-newline", BASE_TEXT, ["--set", "export.model_name=m\n"],
     ["export.model_name: must be letters", r"received 'm\n'"]),
    ("objective-weights-nan", with_key(BASE_TEXT, "aux", '"objective": "infopro", '
                                       '"objective_weights": {"first": [NaN, 0], '
                                       '"last": [1, 2]}'), [],
     ["aux.objective_weights.first[0]: NaN is not a JSON number"]),
    ("set-objective-weights-negative", BASE_TEXT,
     ["--set", "aux.objective=infopro_contrast",
      "--set", 'aux.objective_weights={"first": [6, -1], "last": [1, 2]}'],
     ["aux.objective_weights.first: must be two finite weights >= 0",
      "received [6.0, -1.0]"]),
    ("set-objective-weights-with-cross-entropy", BASE_TEXT,
     ["--set", 'aux.objective_weights={"first": [6, 0], "last": [1, 2]}'],
     ["aux.objective_weights: only applies to aux.objective 'infopro' or "
      "'infopro_contrast', not 'cross_entropy'"]),
]


@pytest.mark.parametrize("text,extra,expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_hostile_recipe_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, text,
                                                              extra, expected):
    path = tmp_path / "bad.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    run_dir = tmp_path / "run"
    # --dry-run: on the old code the numbers that got through started no training.
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train_cli.main, [str(path), "--output", str(run_dir), "--dry-run", *extra])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kgreedy: error: "), lines
    assert len(lines[0]) < 400, lines[0]  # a huge received value is cut
    for fragment in expected:
        assert fragment.replace("{recipe}", str(path)) in lines[0], (fragment, lines[0])
    assert not run_dir.exists()


def test_the_limits_still_accept_what_a_recipe_needs(tmp_path):
    """The boundaries: seed 2**32-1, 100 levels of nesting, 100-digit integers, a
    tiny float that rounds to 0, and NaN as a quoted string."""
    assert recipe_from_dict({**BASE, "seed": 2**32 - 1}).seed == 2**32 - 1
    assert files.loads("[" * 100 + "]" * 100) is not None
    assert files.loads("9" * 100) == int("9" * 100)
    assert files.loads('{"a": 1e-400, "b": "NaN"}') == {"a": 0.0, "b": "NaN"}
    path = tmp_path / "ok.json"
    path.write_text(BASE_TEXT)
    recipe = load_recipe(path, ['description="NaN"', "name=ok.name-1_2"])
    assert (recipe.description, recipe.name) == ("NaN", "ok.name-1_2")


def test_a_file_larger_than_the_limit_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "MAX_JSON_BYTES", 2**20)  # 16 MiB is slow to write
    path = tmp_path / "big.json"
    path.write_text(BASE_TEXT[:-1] + ', "description": "' + "x" * 2**20 + '"}')
    with pytest.raises(KgreedyError, match=r"recipe file is larger than 1 MiB"):
        load_recipe(path)


def test_a_recipe_that_is_not_a_regular_file_is_one_line(tmp_path, capsys):
    """Opening a named pipe for reading waits for a writer forever: the reader checks
    what the path is first, without blocking."""
    pipe = tmp_path / "recipe.json"
    os.mkfifo(pipe)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train_cli.main, [str(pipe), "--dry-run"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"kgreedy: error: {pipe}: recipe file is not a "
                                       "regular file but a named pipe\n")
    with pytest.raises(KgreedyError, match=r"base: recipe file is not a regular file "
                                           r"but a character device; received '/dev/null'"):
        files.read_json("/dev/null", "base", "recipe file")


@pytest.mark.parametrize("key,value", [
    ("train.optimizer.learning_rate", math.nan),
    ("train.optimizer.weight_decay", math.inf),
    ("data.eval_fraction", math.nan),
    ("data.std", [math.nan]),
    ("data.mean", [-math.inf]),
    ("train.optimizer.learning_rate", 10**400),  # an int beyond float's range
], ids=["lr-nan", "decay-inf", "fraction-nan", "std-nan", "mean-minus-inf", "lr-10**400"])
def test_non_finite_numbers_from_python_are_refused_by_the_schema(key, value):
    """NaN passes every range check (all comparisons with it are false): the schema
    itself refuses it, for dicts built in Python that never were JSON."""
    raw = json.loads(BASE_TEXT)
    section, _, leaf = key.rpartition(".")
    node = raw
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[leaf] = value
    with pytest.raises(RecipeError, match=rf"^{key}(\[0\])?: must be a finite number"):
        recipe_from_dict(raw)


def test_a_5000_digit_seed_from_python_is_named_by_its_size():
    # repr() of such an int raises ValueError: the message must not try it.
    with pytest.raises(RecipeError, match=r"seed: must be <= 4294967295; received "
                                          r"'an integer of about 5001 digits'"):
        recipe_from_dict({**BASE, "seed": 10**5000})


def test_tune_recipes_are_read_and_named_as_strictly(tmp_path):
    tune = {"name": "search", "base": BASE, "max_trials": 1}
    with pytest.raises(RecipeError, match=r"^name: must be letters.*received 'search\\n'"):
        tune_recipe_from_dict({**tune, "name": "search\n"})
    with pytest.raises(RecipeError, match=r"^seed: must be <= 4294967295"):
        tune_recipe_from_dict({**tune, "seed": 2**32})
    (tmp_path / "base.json").write_text(
        with_key(BASE_TEXT, "train", '"optimizer": {"learning_rate": NaN}'))
    (tmp_path / "tune.json").write_text(json.dumps({**tune, "base": "base.json"}))
    with pytest.raises(KgreedyError, match=r"^base: .*base.json: train.optimizer."
                                           r"learning_rate: NaN is not a JSON number"):
        load_tune_recipe(tmp_path / "tune.json")


def test_recipe_json_on_resume_is_read_strictly(tmp_path, capsys):
    """A run directory's recipe.json with NaN (as the old code wrote it) is one line."""
    path = tmp_path / "recipe.json"
    path.write_text(BASE_TEXT)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.json").write_text(
        with_key(BASE_TEXT, "train", '"optimizer": {"learning_rate": NaN}'))
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train_cli.main, [str(path), "--output", str(run_dir), "--resume",
                                 "--dry-run"])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("kgreedy: error: --resume: ") and "recipe.json: train." \
        "optimizer.learning_rate: NaN is not a JSON number" in line, line


def test_write_json_never_writes_nan(tmp_path):
    """A non-finite value (an evaluation's NaN loss) is written as null, as
    JavaScript's JSON.stringify does: the file stays JSON that the strict reader
    (and any other) reads back."""
    path = tmp_path / "summary.json"
    files.write_json(path, {"val_loss": math.nan, "scores": [math.inf, 0.5, (-math.inf,)]})
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert files.read_json(path) == {"val_loss": None, "scores": [None, 0.5, [None]]}
    files.append_jsonl(tmp_path / "metrics.jsonl", {"loss": math.nan})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"loss": None}
