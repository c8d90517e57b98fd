"""The package's shape: rooms import only downward, no module imports itself back,
and no module outgrows a reader (docs/DESIGN.md, "Rooms")."""

import ast
import pathlib

import pytest

PACKAGE = next(p for p in pathlib.Path(__file__).resolve().parents
               if (p / "setup.cfg").is_file()) / "kgreedy"

# Lower ranks are imported by higher ones, never the reverse; rooms of one rank do
# not import each other. The command-line modules at the top may import anything.
RANKS = {"base": 0, "config": 1, "data": 2, "model": 2, "training": 3,
         "serving": 4, "analysis": 4, "tuning": 5}
TOP = 6
MAX_LINES = 450


def _modules():
    """{dotted name: path} of every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path, modules):
    """The kgreedy modules `path` imports, anywhere in the file (late imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("kgreedy"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 \
                and node.module and node.module.startswith("kgreedy"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                names.add(child if child in modules else node.module)
    return {n for n in names if n in modules}


def _room(name):
    """The subpackage a module lives in; `commands` for the modules at the top."""
    parts = name.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANKS):
        return parts[1]
    return None if name == "kgreedy" else "commands"


def _rank(name):
    if name == "kgreedy":
        return -1  # the package's own __init__ imports nothing of kgreedy
    return RANKS.get(_room(name), TOP)


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def test_every_room_is_known(graph):
    rooms = {_room(n) for n in graph} - {None, "commands"}
    assert rooms == set(RANKS), "a new subpackage needs a rank here and in docs/DESIGN.md"


def upward_imports(graph):
    """Imports that go up, or sideways between rooms of one rank."""
    wrong = []
    for name, imported in graph.items():
        for other in imported:
            if _room(other) == _room(name) and _room(name) is not None:
                continue
            if _rank(other) >= _rank(name):
                wrong.append(f"{name} (rank {_rank(name)}) imports {other} "
                             f"(rank {_rank(other)})")
    return sorted(wrong)


def circles(graph):
    """Import circles, each as `a -> b -> a`."""
    seen, stack, found = set(), [], []

    def visit(name):
        if name in stack:
            found.append(" -> ".join(stack[stack.index(name):] + [name]))
            return
        if name in seen:
            return
        seen.add(name)
        stack.append(name)
        for other in sorted(graph.get(name, ())):
            visit(other)
        stack.pop()

    for name in sorted(graph):
        visit(name)
    return found


def test_rooms_import_only_downward(graph):
    wrong = upward_imports(graph)
    assert not wrong, "\n".join(wrong)


def test_no_import_circle(graph):
    found = circles(graph)
    assert not found, "\n".join(found)


def test_the_checks_see_what_they_look_for():
    fake = {"kgreedy.model.net": {"kgreedy.training.stage", "kgreedy.config.recipe"},
            "kgreedy.training.stage": {"kgreedy.model.net"},
            "kgreedy.data.spec": {"kgreedy.model.net"},
            "kgreedy.config.recipe": set()}
    assert upward_imports(fake) == [
        "kgreedy.data.spec (rank 2) imports kgreedy.model.net (rank 2)",
        "kgreedy.model.net (rank 2) imports kgreedy.training.stage (rank 3)"]
    assert circles(fake) == ["kgreedy.model.net -> kgreedy.training.stage -> "
                             "kgreedy.model.net"]


def test_no_module_outgrows_a_reader():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


def test_the_vocabulary_and_the_config_need_no_tensorflow():
    # The config room loads recipes in tools and front ends that answer --help
    # without TensorFlow: it imports only base and itself, and no TensorFlow.
    for name, path in _modules().items():
        if _room(name) in ("config", "base"):
            text = path.read_text(encoding="utf-8")
            assert "import tensorflow" not in text and "import keras" not in text, name
