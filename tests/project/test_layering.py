"""The package's shape: rooms import only downward, no module imports itself back,
and no module outgrows a reader (docs/DESIGN.md, "Rooms").

Every module of kgreedy/ and every tool in tools/ belongs to a room with a rank
(`RANKS`). A module imports modules of its own room and of rooms of a lower rank;
rooms of one rank never import each other. The subpackages are rooms of their own;
the top-level modules are grouped (`TOP_LEVEL`):

- `front_end_kit` (cli, quiet): what every command-line front end shares;
- `api_parts` (fitting, heads): what the Python API is built from;
- `api`: the Python API, `kgreedy.api`, and the package itself (`import kgreedy`,
  `from kgreedy import fit`), whose `__init__` loads the API lazily through its
  `_LAZY` map; those lazy names count as the package's imports;
- `front_ends` (train, tune, export, probe, report, predict): the `python -m`
  commands. They may import the library below them, but not the Python API: it is
  a front end of its own, beside them, and the command line does not depend on it;
- `tools` (tools/*.py): command-line programs of the repository, front ends too.
  A tool imports the library (never a front end nor the Python API), another tool
  only by its public names (tools/benchmark.py takes tools/benchmark_child.py's
  probe constants), and nothing private (`_name`) of a tool or of kgreedy, by
  import or through a module it imported. Nothing in kgreedy imports a tool.

Imports are read with `ast`, anywhere in a file (late imports too); relative imports
are made absolute, and `importlib.import_module("...")` with a literal name counts.
`base` and `config` import no TensorFlow or Keras (by the imported module's root
name, `TENSORFLOW`), and every file of kgreedy/ and tools/ has at most `MAX_LINES`
lines. Each rule is checked on a small module graph that breaks it (the
`test_the_checks_see_*` tests), so that a check that stops seeing what it looks for
fails too.
"""

import ast
import pathlib

import pytest

ROOT = next(p for p in pathlib.Path(__file__).resolve().parents
            if (p / "setup.cfg").is_file())
PACKAGE = ROOT / "kgreedy"
TOOLS = ROOT / "tools"

# Lower ranks are imported by higher ones, never the reverse; rooms of one rank do
# not import each other.
RANKS = {"base": 0, "config": 1, "data": 2, "model": 2, "training": 3,
         "serving": 4, "analysis": 4, "tuning": 5,
         "front_end_kit": 6, "api_parts": 6,
         "api": 7, "front_ends": 7, "tools": 7}
# The rooms of the modules at the top of the package ("kgreedy": its __init__).
TOP_LEVEL = {"kgreedy": "api", "api": "api",
             "fitting": "api_parts", "heads": "api_parts",
             "cli": "front_end_kit", "quiet": "front_end_kit",
             "recipe_run": "front_end_kit",
             "train": "front_ends", "tune": "front_ends", "export": "front_ends",
             "probe": "front_ends", "report": "front_ends", "predict": "front_ends"}
MAX_LINES = 450
# Root names of modules that are, or load, TensorFlow or Keras.
TENSORFLOW = ("tensorflow", "keras", "tf_keras", "tensorboard", "tf2onnx")
TENSORFLOW_PREFIXES = ("tensorflow_", "keras_", "tf_")


def _modules():
    """{dotted name: path} of every module of the package (`kgreedy.x.y`) and every
    tool (`tools.x`)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    for path in sorted(TOOLS.glob("*.py")):
        found[f"tools.{path.stem}"] = path
    return found


def _dynamic_import(node):
    """The literal name in `importlib.import_module("x")` or `__import__("x")`."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called in ("import_module", "__import__") and node.args \
            and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str) \
            and not node.args[0].value.startswith("."):
        return node.args[0].value
    return None


def _lazy_map(node):
    """The module names of a `_LAZY = {"name": "module"}` map (the package's
    __init__)."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    if any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in targets) \
            and isinstance(node.value, ast.Dict):
        return [v.value for v in node.value.values
                if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return []


def statements(source, name, is_package=False):
    """(line, module, names) of each import in `source`, the module made absolute:
    `import a.b` gives (line, "a.b", ()), `from .b import c` in `a.x` gives
    (line, "a.b", ("c",)).

    Args:
        source: the module's text.
        name: its dotted name (`kgreedy.model.network`), to resolve relative imports.
        is_package: whether it is a package's `__init__`.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                if node.level - 1 >= len(package):
                    raise ValueError(f"{name}:{node.lineno} imports beyond the top "
                                     f"package. Received: level={node.level}")
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, module, tuple(a.name for a in node.names)))
        elif isinstance(node, ast.Call) and (module := _dynamic_import(node)):
            found.append((node.lineno, module, ()))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            found += [(node.lineno, module, ()) for module in _lazy_map(node)]
    return found


def _ours(module, modules):
    """`module` as a name of `modules` (a tool's bare `import benchmark_child` is
    `tools.benchmark_child`: tools run with tools/ on their path), or None when it is
    neither kgreedy's nor a tool."""
    root = module.partition(".")[0]
    if root not in ("kgreedy", "tools") and f"tools.{root}" in modules:
        module = f"tools.{module}"
    return module if module.partition(".")[0] in ("kgreedy", "tools") else None


def imports(source, name, modules, is_package=False):
    """{module: line} of the kgreedy modules and tools that `source` imports; a
    `from a import b` imports `a.b` where that is a module, else `a` (whose __init__
    holds `b`): `from kgreedy import fit` imports the package itself."""
    found = {}
    for line, module, names in statements(source, name, is_package):
        module = _ours(module, modules)
        if module is None:
            continue
        children = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
        whole = not names or len(children) < len(names)
        targets = children + ([module] if whole else [])
        for target in targets:
            found.setdefault(target, line)
    return found


def graph_of(sources, modules=None):
    """{name: {imported module: line}} of `sources` ({name: (text, is_package)})."""
    modules = set(sources) | set(modules or ())
    return {name: imports(text, name, modules, is_package)
            for name, (text, is_package) in sources.items()}


@pytest.fixture(scope="module")
def sources():
    return {name: (path.read_text(encoding="utf-8"), path.name == "__init__.py")
            for name, path in _modules().items()}


@pytest.fixture(scope="module")
def graph(sources):
    return graph_of(sources)


def room(name):
    """The room of a module: `tools`, its subpackage, or its `TOP_LEVEL` group (a new
    top-level module's own name, which `RANKS` does not know)."""
    parts = name.split(".")
    if parts[0] == "tools":
        return "tools"
    if len(parts) > 2:
        return parts[1]
    top = parts[1] if len(parts) == 2 else "kgreedy"
    return TOP_LEVEL.get(top, top)


def test_every_room_is_known(sources):
    rooms = {room(n) for n in sources}
    assert rooms <= set(RANKS), (
        f"a new subpackage or top-level module needs a room and a rank here and in "
        f"docs/DESIGN.md. Received: rooms={sorted(rooms - set(RANKS))}")
    assert rooms == set(RANKS), f"rooms without modules: {sorted(set(RANKS) - rooms)}"


def upward_imports(graph):
    """Imports that go up, or sideways between rooms of one rank."""
    wrong = []
    for name, imported in graph.items():
        mine = room(name)
        for other, line in imported.items():
            theirs = room(other)
            if theirs == mine or mine not in RANKS or theirs not in RANKS:
                continue  # an unknown room fails test_every_room_is_known
            if RANKS[theirs] >= RANKS[mine]:
                wrong.append(f"{name}:{line} ({mine}, rank {RANKS[mine]}) imports "
                             f"{other} ({theirs}, rank {RANKS[theirs]})")
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


def missing_modules(graph):
    """Imports of kgreedy modules or tools that do not exist (a late import that
    no test reaches would fail only when it runs)."""
    return sorted(f"{name}:{line} imports {other}, which is not a module"
                  for name, imported in graph.items()
                  for other, line in imported.items() if other not in graph)


def _private(word):
    return word.startswith("_") and not word.endswith("__")


def _bound_modules(tree, modules):
    """{local name: module} of the kgreedy modules and tools a tool binds whole."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (module := _ours(alias.name, modules)) in modules:
                    local = alias.asname or alias.name.partition(".")[0]
                    bound[local] = module if alias.asname else _ours(local, modules)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                module = _ours(f"{node.module}.{alias.name}", modules)
                if module in modules:
                    bound[alias.asname or alias.name] = module
    return bound


def _private_uses(tree, modules):
    """(line, `module._name`) of each private name a tool reaches through a module
    it imported whole (`benchmark_child._spawn()`)."""
    bound = _bound_modules(tree, modules)
    found = set()
    for node in ast.walk(tree):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.insert(0, node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in bound \
                and any(_private(p) for p in parts):
            used = parts[:next(i for i, p in enumerate(parts) if _private(p)) + 1]
            found.add((node.lineno, ".".join([bound[node.id], *used])))
    return found


def private_imports(sources):
    """Names starting with `_` that a tool imports from a tool or from kgreedy, or
    reaches through a module it imported."""
    modules = set(sources)
    wrong = []
    for name, (text, is_package) in sources.items():
        if room(name) != "tools":
            continue
        for line, module, names in statements(text, name, is_package):
            ours = _ours(module, modules)
            if ours and any(_private(w) for w in ours.split(".") + list(names)):
                wrong.append(f"{name}:{line} imports a private name: "
                             f"{ours} {', '.join(names)}".rstrip())
        wrong += [f"{name}:{line} uses a private name: {used}"
                  for line, used in _private_uses(ast.parse(text), modules)]
    return sorted(wrong)


def tensorflow_imports(sources):
    """Imports of TensorFlow or Keras (by root name) in the rooms base and config."""
    wrong = []
    for name, (text, is_package) in sources.items():
        if room(name) not in ("base", "config"):
            continue
        for line, module, _ in statements(text, name, is_package):
            root = module.partition(".")[0]
            if root in TENSORFLOW or root.startswith(TENSORFLOW_PREFIXES):
                wrong.append(f"{name}:{line} imports {module}")
    return sorted(wrong)


def long_files(paths):
    """{path: lines} of the files over `MAX_LINES`."""
    return {str(p): n for p in paths
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}


@pytest.mark.parametrize("check", [upward_imports, circles, missing_modules],
                         ids=lambda check: check.__name__)
def test_the_import_graph_keeps_the_rules(graph, check):
    wrong = check(graph)
    assert not wrong, "\n".join(wrong)


# The config room loads recipes in tools and front ends that answer --help without
# TensorFlow: it imports only base and itself (the ranks), and no TensorFlow.
@pytest.mark.parametrize("check", [private_imports, tensorflow_imports],
                         ids=lambda check: check.__name__)
def test_the_sources_keep_the_rules(sources, check):
    wrong = check(sources)
    assert not wrong, "\n".join(wrong)


def test_no_module_outgrows_a_reader():
    long = long_files([*PACKAGE.rglob("*.py"), *TOOLS.glob("*.py")])
    assert not long, long


# The checks, each on a small graph that breaks its rule.

def _source(*lines):
    return "\n".join(lines) + "\n"


def test_the_checks_see_what_they_look_for():
    fake = graph_of({
        "kgreedy.model.net": (_source("from kgreedy.training import stage",
                                      "import kgreedy.config.recipe"), False),
        "kgreedy.training.stage": (_source("from kgreedy.model.net import Net"), False),
        "kgreedy.data.spec": (_source("from kgreedy.model import net"), False),
        "kgreedy.config.recipe": ("", False)})
    assert upward_imports(fake) == [
        "kgreedy.data.spec:1 (data, rank 2) imports kgreedy.model.net (model, rank 2)",
        "kgreedy.model.net:1 (model, rank 2) imports kgreedy.training.stage "
        "(training, rank 3)"]
    assert circles(fake) == ["kgreedy.model.net -> kgreedy.training.stage -> "
                             "kgreedy.model.net"]


def test_the_checks_see_the_package_itself_as_the_api():
    # `import kgreedy` reaches the Python API through the package's lazy names: a
    # room below it that uses `kgreedy.fit` imports upward.
    fake = graph_of({
        "kgreedy": (_source('_LAZY = {"fit": "kgreedy.api"}'), True),
        "kgreedy.api": (_source("from kgreedy.base import errors"), False),
        "kgreedy.base.errors": ("", False),
        "kgreedy.base.files": (_source("import kgreedy"), False),
        "kgreedy.base.faults": (_source("from kgreedy import fit"), False),
        "kgreedy.base.machine": (_source("import importlib",
                                         "importlib.import_module('kgreedy.api')"),
                                 False)})
    assert fake["kgreedy"] == {"kgreedy.api": 1}
    assert upward_imports(fake) == [
        "kgreedy.base.faults:1 (base, rank 0) imports kgreedy (api, rank 7)",
        "kgreedy.base.files:1 (base, rank 0) imports kgreedy (api, rank 7)",
        "kgreedy.base.machine:2 (base, rank 0) imports kgreedy.api (api, rank 7)"]


def test_the_checks_see_relative_imports():
    fake = graph_of({
        "kgreedy.model": (_source("from . import net", "from .. import training"),
                          True),
        "kgreedy.model.net": (_source("from ..training.stage import StageLoop",
                                      "from .layers import ConvBlock"), False),
        "kgreedy.model.layers": ("", False),
        "kgreedy.training": ("", True),
        "kgreedy.training.stage": ("", False)})
    assert fake["kgreedy.model"] == {"kgreedy.model.net": 1, "kgreedy.training": 2}
    assert upward_imports(fake) == [
        "kgreedy.model.net:1 (model, rank 2) imports kgreedy.training.stage "
        "(training, rank 3)",
        "kgreedy.model:2 (model, rank 2) imports kgreedy.training (training, rank 3)"]
    with pytest.raises(ValueError, match="beyond the top package"):
        statements("from ... import x", "kgreedy.model", is_package=False)
    with pytest.raises(ValueError, match="beyond the top package"):
        statements("from .. import x", "kgreedy", is_package=True)


def test_the_checks_see_tensorflow_by_module_not_by_text():
    fake = {"kgreedy.config.recipe": (_source(
                "from keras import ops", "import tensorflow.compat.v1 as tf",
                "import tf_keras", "def f():", "    import tensorflow_datasets as tfds",
                "    return __import__('keras_tuner')"), False),
            "kgreedy.base.files": (_source(
                '"""Says import tensorflow, and keras, only in words."""',
                "import kerasy", "# import tensorflow"), False),
            "kgreedy.model.net": (_source("import keras"), False)}
    assert tensorflow_imports(fake) == [
        "kgreedy.config.recipe:1 imports keras",
        "kgreedy.config.recipe:2 imports tensorflow.compat.v1",
        "kgreedy.config.recipe:3 imports tf_keras",
        "kgreedy.config.recipe:5 imports tensorflow_datasets",
        "kgreedy.config.recipe:6 imports keras_tuner"]


def test_the_checks_see_the_order_of_the_top_level_modules():
    fake = graph_of({
        "kgreedy.train": (_source("from kgreedy.api import stage_table",
                                  "from kgreedy import cli, fit, fitting"), False),
        "kgreedy.api": (_source("from kgreedy import fitting"), False),
        "kgreedy.fitting": (_source("from kgreedy.train import main"), False),
        "kgreedy.cli": (_source("from kgreedy import quiet, tune"), False),
        "kgreedy.quiet": ("", False), "kgreedy.tune": ("", False),
        "kgreedy": ("", True)})
    assert fake["kgreedy.train"] == {"kgreedy.api": 1, "kgreedy.cli": 2,
                                     "kgreedy.fitting": 2, "kgreedy": 2}
    assert upward_imports(fake) == [
        "kgreedy.cli:1 (front_end_kit, rank 6) imports kgreedy.tune "
        "(front_ends, rank 7)",
        "kgreedy.fitting:1 (api_parts, rank 6) imports kgreedy.train "
        "(front_ends, rank 7)",
        "kgreedy.train:1 (front_ends, rank 7) imports kgreedy.api (api, rank 7)",
        "kgreedy.train:2 (front_ends, rank 7) imports kgreedy (api, rank 7)"]


def test_the_checks_see_the_tools(tmp_path):
    fake = {"tools.bench": (_source("import bench_child",
                                    "from bench_child import READY, _spawn",
                                    "from kgreedy.base._cache import size",
                                    "from kgreedy import train",
                                    "import kgreedy.base.errors as errors",
                                    "print(bench_child._spawn.__doc__, errors._CODES,",
                                    "      bench_child.READY, errors.__file__)"),
                            False),
            "tools.bench_child": (_source("from kgreedy.base.errors import DataError",
                                          "import kgreedy.serving.gone"), False),
            "kgreedy.base.errors": ("", False), "kgreedy.base._cache": ("", False),
            "kgreedy.train": ("", False),
            "kgreedy.data.images": (_source("import bench"), False)}
    graph = graph_of(fake)
    assert graph["tools.bench"] == {"tools.bench_child": 1, "kgreedy.base._cache": 3,
                                    "kgreedy.train": 4, "kgreedy.base.errors": 5}
    assert upward_imports(graph) == [
        "kgreedy.data.images:1 (data, rank 2) imports tools.bench (tools, rank 7)",
        "tools.bench:4 (tools, rank 7) imports kgreedy.train (front_ends, rank 7)"]
    assert missing_modules(graph) == [
        "tools.bench_child:2 imports kgreedy.serving.gone, which is not a module"]
    assert private_imports(fake) == [
        "tools.bench:2 imports a private name: tools.bench_child READY, _spawn",
        "tools.bench:3 imports a private name: kgreedy.base._cache size",
        "tools.bench:6 uses a private name: kgreedy.base.errors._CODES",
        "tools.bench:6 uses a private name: tools.bench_child._spawn"]
    (tmp_path / "short.py").write_text("x = 1\n" * MAX_LINES, encoding="utf-8")
    (tmp_path / "long.py").write_text("x = 1\n" * (MAX_LINES + 1), encoding="utf-8")
    assert long_files(sorted(tmp_path.glob("*.py"))) == {
        str(tmp_path / "long.py"): MAX_LINES + 1}
