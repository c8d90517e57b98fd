"""The README stays true: its test command is what CI runs, its reference is the code's."""

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_recipe_reference_matches_the_code():
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- recipe-reference:start -->\n(.*?)\n<!-- recipe-reference:end -->",
                      readme, re.S).group(1)
    generated = runpy.run_path(str(ROOT / "tools" / "recipe_reference.py"))["reference_table"]()
    assert table == generated, "README out of date: run python tools/recipe_reference.py"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'python -m pip install -e ".[test]" && python -m pytest -q'
    assert command in readme
    assert any(line.strip() == command for line in ci.splitlines())


def test_readme_recipes_exist():
    readme = (ROOT / "README.md").read_text()
    for name in set(re.findall(r"`(\w+\.json)`", readme)) - {"recipe.json", "summary.json",
                                                            "dataset.json"}:
        assert (ROOT / "recipes" / name).is_file(), name
