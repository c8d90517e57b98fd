"""The documentation stays true: the README's test command is what CI runs, the recipe
reference is the code's, and on README.md and every docs/*.md page the links resolve
(anchors included), the paths and modules named exist, and the recipes named exist."""

import ast
import builtins
import re
import runpy
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())
README = ROOT / "README.md"
REFERENCE = re.compile(r"<!-- recipe-reference:start -->\n(.*?)\n<!-- recipe-reference:end -->",
                       re.S)

# Pages that the docs link to and that another change is writing: a link to one is
# not an error while it is missing. Add {"docs/X.md": "why"} while a page is being
# written; test_pending_pages_are_still_missing fails once it exists, so the entry
# is removed and the page is held to every check below.
PENDING_PAGES = {}


def doc_pages():
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def _name(page):
    return page.relative_to(ROOT).as_posix()


def _parts(markdown):
    """(prose, fenced blocks, inline code spans) of a page: the prose without code,
    each fenced block as (info string, text), and the spans of the prose."""
    prose, blocks, fence, block = [], [], None, []
    for line in markdown.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence, block = stripped[3:].strip(), []
            else:
                blocks.append((fence, "\n".join(block)))
                fence = None
            prose.append("")
        elif fence is None:
            prose.append(line)
        else:
            block.append(line)
    text = "\n".join(prose)
    spans = re.findall(r"`([^`]+)`", text)
    return re.sub(r"`[^`]*`", "", text), blocks, spans


def slug(heading):
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation other
    than `-` and `_` dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page):
    """Every anchor a page defines: its headings' slugs (duplicates numbered)."""
    # Headings come from the page without its fenced blocks (a `# comment` in a
    # bash block is no heading); inline code is kept in the heading text.
    seen, found, fence = {}, set(), None
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("```"):
            fence = None if fence else True
            continue
        match = None if fence else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page):
    """The relative links and images of a page's prose: (target, anchor)."""
    prose, _, _ = _parts(page.read_text(encoding="utf-8"))
    for target in re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        yield path, anchor


# ------------------------------------------------------------- the pages ----

def test_recipe_reference_matches_the_code():
    holders = [p for p in doc_pages() if REFERENCE.search(p.read_text(encoding="utf-8"))]
    assert [_name(p) for p in holders] == ["docs/recipes.md"], (
        "the recipe reference belongs on docs/recipes.md, once")
    table = REFERENCE.search(holders[0].read_text(encoding="utf-8")).group(1)
    generated = runpy.run_path(str(ROOT / "tools" / "recipe_reference.py"))["reference_table"]()
    assert table == generated, ("docs/recipes.md out of date: paste the output of "
                                "python tools/recipe_reference.py between its markers")


def test_ci_runs_the_readme_test_command():
    readme = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'python -m pip install -e ".[test]" && python -m pytest -q'
    assert command in readme
    assert any(line.strip() == command for line in ci.splitlines())


def test_readme_names_the_fast_subset():
    _, _, spans = _parts(README.read_text(encoding="utf-8"))
    assert 'python -m pytest -q -m "not slow"' in spans


def test_readme_stays_a_newcomers_page():
    readme = README.read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200, "README.md is the short page; move details to docs/"
    for page in doc_pages()[1:]:
        if _name(page) not in PENDING_PAGES:
            assert f"]({_name(page)})" in readme, f"README.md does not link {_name(page)}"


@pytest.mark.parametrize("page", doc_pages(), ids=_name)
def test_links_resolve(page):
    broken = []
    for path, anchor in links(page):
        target = (page.parent / path).resolve() if path else page
        if path and not target.exists():
            if target.relative_to(ROOT).as_posix() in PENDING_PAGES and not anchor:
                continue
            broken.append(f"{path}: no such file")
        elif anchor:
            assert target.suffix == ".md", f"{path}#{anchor}: anchors only into pages"
            if anchor not in anchors(target):
                broken.append(f"{path}#{anchor}: no such heading in {_name(target)}")
    assert not broken, f"{_name(page)} has broken links:\n" + "\n".join(broken)


def test_pending_pages_are_still_missing():
    written = sorted(p for p in PENDING_PAGES if (ROOT / p).is_file())
    assert not written, f"written now: remove them from PENDING_PAGES: {written}"


def test_the_design_page_exists_with_the_sections_code_cites():
    """docs/DESIGN.md is the design the code's docstrings cite by heading
    (`docs/DESIGN.md, "Rooms"`); its links are checked with every page's."""
    design = ROOT / "docs" / "DESIGN.md"
    assert design.is_file(), "docs/DESIGN.md is missing"
    headings = {slug(h) for h in re.findall(r"^#{2,3}\s+(.*?)\s*$",
                                             design.read_text(encoding="utf-8"), re.M)}
    cited = set()
    for path in [*ROOT.glob("kgreedy/**/*.py"), *ROOT.glob("tests/**/*.py"),
                 *ROOT.glob("tools/*.py")]:
        cited.update(re.findall(r'DESIGN\.md,\s+"([^"]+)"', path.read_text(encoding="utf-8")))
    missing = sorted(c for c in cited if slug(c) not in headings)
    assert not missing, f"docs/DESIGN.md has no section for these citations: {missing}"


PATH = re.compile(r"(?<![\w./$-])((?:kgreedy|tools|tests|recipes|docs)/[\w./-]*)(?![\w{$*<])")
MODULE = re.compile(r"kgreedy(\.[a-z_][a-z0-9_]*)+(\.[A-Za-z_]\w*)*")


def _module_exists(dotted):
    """`kgreedy.a.b.Name`: a package path down to a module file (the rest may be
    attributes)."""
    path = ROOT
    for part in dotted.split("."):
        if (path / part).is_dir():
            path = path / part
        elif (path / f"{part}.py").is_file():
            return True
        else:
            return False
    return True


@pytest.mark.parametrize("page", doc_pages(), ids=_name)
def test_named_paths_and_modules_exist(page):
    """Paths in code (`kgreedy/...`, `tools/...`, ...) and module names
    (`kgreedy.training.stage.StageLoop`) name what exists. The generated recipe
    reference is the code's own text and is left to the code."""
    text = REFERENCE.sub("", page.read_text(encoding="utf-8"))
    _, blocks, spans = _parts(text)
    code = spans + [body for info, body in blocks if info != "python"]
    missing = sorted({p for c in code for p in PATH.findall(c)
                      if not (ROOT / p.rstrip(".")).exists()})
    missing += sorted({s for s in spans if MODULE.fullmatch(s) and not _module_exists(s)})
    assert not missing, f"{_name(page)} names what does not exist: {missing}"



# ------------------------------------------------------ DESIGN's names ----

# Names DESIGN.md cites from outside the package (Python's builtins are found by
# themselves), each with what it is.
FOREIGN = {
    "AdaptiveAveragePooling2D": "Keras' layer, which DESIGN says fails in a tf.function",
    "FailedTrialError": "keras-tuner's error that fails one trial",
    "FatalError": "keras-tuner's error that stops the search",
    "History": "Keras' callback that kgreedy.fit returns the like of",
    "LossScaleOptimizer": "Keras' optimizer wrapper for mixed_float16",
    "NaN": "the IEEE value as JSON writes it",
    "PredictionLog": "TensorFlow Serving's warm-up record",
    "ResourceExhaustedError": "TensorFlow's out-of-memory error",
    "ResourceScatterUpdate": "TensorFlow's op",
    "UnavailableError": "TensorFlow's lost-worker error",
    "stop_gradient": "TensorFlow's op",
}
# First parts of dotted names that are other packages' modules.
FOREIGN_MODULES = {"keras", "keras_tuner", "np", "os", "tf", "tfds"}
# `GreedyNet`, `_Records`, `EpochDriver.start_at`, `Exporter(net, stage)`: a class (or
# a CamelCase function) and the members named after it.
CAMEL = re.compile(r"(_?[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*)((?:\.[A-Za-z_]\w*)*)")
# `balanced_split_points(model, K)`, `driver.run()`: a call; `_fit_stage`: a private
# function (recipe keys and JSON fields are snake_case too, but never private).
CALL = re.compile(r"([a-z_]\w*(?:\.[A-Za-z_]\w*)*)\(")
PRIVATE = re.compile(r"_[a-z][a-z0-9_]*")
DOTTED = re.compile(r"kgreedy((?:\.[A-Za-z_]\w*)+)")


class _Source:
    """What the package's source defines, read with ast (nothing is imported):
    every function, every class with its members (methods, class attributes,
    attributes set on `self`, and its bases' from the package), and each module's
    top-level names."""

    def __init__(self, root):
        self.root = root
        self.functions, self.classes, self.top = set(), {}, {}
        for path in [*root.glob("kgreedy/**/*.py"), *root.glob("tools/*.py")]:
            tree = ast.parse(path.read_text(encoding="utf-8"))
            self.top[path] = _top_names(tree)
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.functions.add(node.name)
                elif isinstance(node, ast.ClassDef):
                    self.classes.setdefault(node.name, []).append(node)

    def members(self, name, seen=()):
        """What a class of that name defines or sets on `self`, its bases' too."""
        found = set()
        for node in self.classes.get(name, ()):
            for child in ast.walk(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found.add(child.name)
                targets = (child.targets if isinstance(child, ast.Assign) else
                           [child.target] if isinstance(child, ast.AnnAssign) else [])
                for target in targets:
                    if isinstance(target, ast.Name):
                        found.add(target.id)
                    elif (isinstance(target, ast.Attribute)
                          and isinstance(target.value, ast.Name)
                          and target.value.id == "self"):
                        found.add(target.attr)
            for base in node.bases:
                base = base.id if isinstance(base, ast.Name) else None
                if base in self.classes and base not in seen:
                    found |= self.members(base, (*seen, name))
        return found

    def has_chain(self, name, attrs):
        """Whether `name` is a class or function and `attrs[0]` is a member of it
        (what follows may be an attribute of that member)."""
        if name not in self.classes:
            return name in self.functions and not attrs
        return not attrs or attrs[0] in self.members(name)

    def module(self, parts):
        """The file of the longest module path `parts` starts with, and the rest."""
        path, file = self.root / "kgreedy", self.root / "kgreedy" / "__init__.py"
        for i, part in enumerate(parts):
            if (path / part).is_dir():
                path, file = path / part, path / part / "__init__.py"
            elif (path / f"{part}.py").is_file():
                return path / f"{part}.py", parts[i + 1:]
            else:
                return file, parts[i:]
        return file, []

    def has_dotted(self, dotted):
        """`kgreedy.a.b.Name.member`: a module, then a name it defines, then
        (for a class) a member."""
        file, rest = self.module(dotted.split(".")[1:])
        if not rest:
            return True
        if rest[0] not in self.top.get(file, ()):
            return False
        return len(rest) == 1 or self.has_chain(rest[0], rest[1:])


def _top_names(tree):
    """A module's top-level names: definitions, assignments, imports, and the
    names a package loads on first use (kgreedy's `_LAZY`)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if any(getattr(t, "id", None) == "_LAZY" for t in targets):
                names.update(ast.literal_eval(node.value))
    return names


def missing_design_names(root):
    """The names in backticks in docs/DESIGN.md's prose that look like Python
    classes or functions of the package and that its source does not define."""
    source = _Source(root)
    _, _, spans = _parts((root / "docs" / "DESIGN.md").read_text(encoding="utf-8"))
    missing = set()
    for span in (" ".join(s.split()) for s in spans):
        dotted, camel, call = DOTTED.match(span), CAMEL.match(span), CALL.match(span)
        if dotted:
            found = source.has_dotted(dotted.group(0))
        elif camel:
            name, attrs = camel.group(1), camel.group(2).split(".")[1:]
            found = (name in FOREIGN or hasattr(builtins, name)
                     or source.has_chain(name, attrs))
        elif call:
            parts = call.group(1).split(".")
            found = (parts[0] in FOREIGN_MODULES or parts[-1] in FOREIGN
                     or parts[-1] in source.functions)
        elif PRIVATE.fullmatch(span):
            found = (span in source.functions
                     or any(span in names for names in source.top.values()))
        else:
            continue
        if not found:
            missing.add(span)
    return sorted(missing)


def test_design_names_what_exists():
    """Every class or function DESIGN.md names in backticks (`GreedyNet`,
    `EpochDriver.start_at`, `balanced_split_points(model, K)`, `_fit_stage`,
    `kgreedy.serving.export.Exporter`) is defined in kgreedy/ or tools/, so the
    design page follows renames."""
    missing = missing_design_names(ROOT)
    assert not missing, ("docs/DESIGN.md names what kgreedy/ and tools/ do not define "
                         f"(or add it to FOREIGN with what it is): {missing}")


def test_design_names_check_finds_a_stale_name(tmp_path):
    """The check above catches each kind of name it reads."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "kgreedy" / "sub").mkdir(parents=True)
    (tmp_path / "kgreedy" / "__init__.py").write_text('_LAZY = {"fit": "kgreedy.api"}\n')
    (tmp_path / "kgreedy" / "sub" / "__init__.py").write_text("")
    (tmp_path / "kgreedy" / "sub" / "mod.py").write_text(
        "class Base:\n    def run(self):\n        self.done = True\n\n\n"
        "class Thing(Base):\n    size = 1\n\n\ndef _helper():\n    pass\n\n\n_cache = {}\n")
    kept = ("`Thing`, `Thing.run`, `Thing.done`, `Thing.size`, `Thing(x=1)`, `_helper`, "
            "`_helper()`, `_cache`, `kgreedy.sub.mod.Thing.run`, `kgreedy.fit(...)`, "
            "`kgreedy.sub`, `keras.Model(...)`, `ValueError`, `NaN`, `train.mode`, "
            "`RUN_DIR/.lock`")
    stale = ("`Gone`, `Thing.gone`, `_gone`, `gone(x)`, `kgreedy.sub.mod.Gone`, "
             "`kgreedy.sub.mod.Thing.gone`, `kgreedy.gone(...)`, `driver.gone()`")
    (tmp_path / "docs" / "DESIGN.md").write_text(f"Kept: {kept}.\n\nStale: {stale}.\n")
    assert missing_design_names(tmp_path) == sorted(s.strip("`") for s in stale.split(", "))


RUN_FILES = {"recipe.json", "summary.json", "dataset.json", "probes.json", "tuning.json",
             "best_recipe.json", "tune_recipe.json", "fit.json", "net.json"}


@pytest.mark.parametrize("page", doc_pages(), ids=_name)
def test_recipes_named_exist(page):
    _, _, spans = _parts(page.read_text(encoding="utf-8"))
    names = {s for s in spans if re.fullmatch(r"(tune/)?[a-z0-9]\w*\.json", s)} - RUN_FILES
    missing = sorted(n for n in names if not (ROOT / "recipes" / n).is_file())
    assert not missing, f"{_name(page)} names recipes that recipes/ does not have: {missing}"


def test_no_design_section_numbers():
    """DESIGN.md is linked as a page, never by section number."""
    hits = [f"{_name(p)}: {m}" for p in doc_pages() for m in
            re.findall(r"DESIGN\.md\W{0,3}(?:§|sections?)\s*\d+", p.read_text(encoding="utf-8"))]
    assert not hits, hits


def test_anchor_slugs_follow_github():
    assert slug("Overriding keys with `--set`") == "overriding-keys-with---set"
    assert slug("The feature cache's threshold (`train.cache_features: auto`)") == (
        "the-feature-caches-threshold-traincache_features-auto")
    assert slug("Searching auxiliary heads (keras-tuner)") == (
        "searching-auxiliary-heads-keras-tuner")
