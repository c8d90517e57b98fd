"""Tests of kgreedy.export: serving signatures, versions, atomicity and the CLI."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from kgreedy import cli
from kgreedy import data
from kgreedy import export as export_cli
from kgreedy.base.errors import KgreedyError
from kgreedy.serving import export, versions, warmup_file
from kgreedy.training import rundir
from tiny_nets import trained_net

RECIPE = {"name": "t", "model": {"blocks": [{"width": 8}, {"width": 16, "downsample": "psi"}]},
          "aux": {"k": 2, "width": 8}, "data": {"max_pixels": 4096}}
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
REPO = str(next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file()))

# `import tensorflow` itself imports keras when it is installed (TF's __init__
# eagerly imports keras.src.optimizers and swallows ImportError), so "a process that
# imports neither kgreedy nor keras" can only be had by making them unimportable.
# The finder below does that, as in a serving image without them.
CLEAN_LOADER = textwrap.dedent("""
    import importlib.abc, importlib.machinery, json, sys

    class _Refuse(importlib.abc.Loader):
        def create_module(self, spec):
            raise ImportError(spec.name + " is blocked in this process")
        def exec_module(self, module):
            pass

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("keras", "tf_keras", "kgreedy"):
                return importlib.machinery.ModuleSpec(name, _Refuse())
            return None

    sys.meta_path.insert(0, _Block())
    import numpy as np
    import tensorflow as tf

    model_dir, images_path, out_path = sys.argv[1:4]
    loaded = tf.saved_model.load(model_dir)
    x = np.load(images_path)
    pngs = tf.stack([tf.io.encode_png(tf.cast(image, tf.uint8)) for image in x])
    results = {}
    for name, kwargs in [("serving_default", {"images": tf.constant(x)}),
                         ("serve_encoded", {"image_bytes": pngs})]:
        out = loaded.signatures[name](**kwargs)
        results[name] = {k: {"dtype": v.dtype.name, "shape": v.shape.as_list(),
                             "value": [s.decode() for s in v.numpy()]
                             if v.dtype == tf.string else v.numpy().tolist()}
                         for k, v in out.items()}
    results["modules"] = sorted(m for m in ("keras", "kgreedy", "tf_keras")
                                if m in sys.modules)
    with open(out_path, "w") as f:
        json.dump(results, f)
""")


def _tree(root):
    """Every path below root (for 'nothing was created or changed')."""
    found = set()
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            found.add((os.path.relpath(path, root), os.path.getsize(path)
                       if os.path.isfile(path) else None))
    return found


def _tmp_dirs(root):
    return [name for name in os.listdir(root) if name.startswith(".tmp-")]


@pytest.fixture(scope="module")
def trained():
    """A tiny 2-stage net, briefly trained so predictions and BN statistics are not
    those of a fresh initialisation; and the digits eval images."""
    return trained_net(RECIPE, epochs=2)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """One export of the last stage, shared by the signature tests."""
    _, spec, net, _ = trained
    root = str(tmp_path_factory.mktemp("export"))
    path = export.export_saved_model(net, spec, root)
    return path, tf.saved_model.load(path)


def _probabilities(model, x):
    return tf.nn.softmax(model(x, training=False)).numpy()


# ------------------------------------------------------------- signatures ----

@pytest.mark.slow
def test_export_runs_without_keras_and_matches_keras_model(trained, exported, tmp_path):
    _, spec, net, x = trained
    path, _ = exported
    assert (x == np.round(x)).all() and x.min() >= 0 and x.max() <= 16  # PNG is lossless
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "load.py"
    script.write_text(CLEAN_LOADER)
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(script), path, str(tmp_path / "x.npy"),
                           str(out)], env=ENV, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["modules"] == []

    want_probs = _probabilities(net.deployed_model(), x)
    want_ids = np.argmax(net.deployed_model()(x), axis=-1)
    assert len(set(want_ids.tolist())) >= 5  # the comparison says something
    n = len(x)
    for name in ("serving_default", "serve_encoded"):
        got = results[name]
        assert {k: (v["dtype"], v["shape"]) for k, v in got.items()} == {
            "probabilities": ("float32", [n, 10]), "class_ids": ("int64", [n]),
            "class_names": ("string", [n])}, name
        np.testing.assert_array_equal(got["class_ids"]["value"], want_ids, err_msg=name)
        np.testing.assert_allclose(got["probabilities"]["value"], want_probs, atol=1e-5,
                                   err_msg=name)
        assert got["class_names"]["value"] == [spec.class_names[i] for i in want_ids]


def test_signature_specs(exported):
    path, loaded = exported
    assert set(loaded.signatures) == {"serving_default", "serve_encoded"}
    default = loaded.signatures["serving_default"]
    assert default.structured_input_signature == (
        (), {"images": tf.TensorSpec([None, 8, 8, 1], tf.float32, name="images")})
    encoded = loaded.signatures["serve_encoded"]
    assert encoded.structured_input_signature == (
        (), {"image_bytes": tf.TensorSpec([None], tf.string, name="image_bytes")})
    for fn in (default, encoded):
        outputs = {k: (v.dtype, v.shape.as_list()) for k, v in fn.structured_outputs.items()}
        assert outputs == {"probabilities": (tf.float32, [None, 10]),
                           "class_ids": (tf.int64, [None]),
                           "class_names": (tf.string, [None])}
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))


def test_serve_encoded_rejects_wrong_size(exported):
    _, loaded = exported
    fn = loaded.signatures["serve_encoded"]
    good = tf.io.encode_png(tf.zeros([8, 8, 1], tf.uint8))
    assert fn(image_bytes=tf.stack([good]))["class_ids"].shape == [1]
    bad = tf.io.encode_png(tf.zeros([9, 8, 1], tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be 8x8 pixels"):
        fn(image_bytes=tf.stack([good, bad]))


def test_serving_default_rejects_wrong_size(exported):
    _, loaded = exported
    with pytest.raises(tf.errors.InvalidArgumentError, match="not compatible"):
        loaded.signatures["serving_default"](images=tf.zeros([1, 9, 8, 1]))


@pytest.mark.parametrize("eval_resize", ["resize", "resize_crop"])
def test_resizing_spec_takes_any_size(trained, tmp_path, eval_resize):
    _, spec, net, x = trained
    spec = dataclasses.replace(spec, eval_resize=eval_resize)
    loaded = tf.saved_model.load(export.export_saved_model(net, spec, str(tmp_path)))
    default = loaded.signatures["serving_default"]
    assert default.structured_input_signature[1]["images"].shape.as_list() == [
        None, None, None, 1]
    big = np.repeat(np.repeat(x[:16], 2, axis=1), 2, axis=2)  # 16x16, integer values
    want = _probabilities(net.deployed_model(), data.eval_transform(big, spec))
    if eval_resize == "resize":  # the shared transform is what we think it is
        np.testing.assert_allclose(data.eval_transform(big, spec),
                                   tf.image.resize(big, (8, 8)))
    np.testing.assert_allclose(default(images=tf.constant(big))["probabilities"], want,
                               atol=1e-5)
    pngs = tf.stack([tf.io.encode_png(tf.cast(image, tf.uint8)) for image in big])
    np.testing.assert_allclose(
        loaded.signatures["serve_encoded"](image_bytes=pngs)["probabilities"], want,
        atol=1e-5)


def test_a_resizing_serving_default_refuses_images_above_max_pixels(trained, tmp_path):
    """serving_default of a resizing model takes any size, so the export's pixel limit
    holds there too: 10x10 = 100 pixels pass a limit of 100, 10x11 do not."""
    _, spec, net, x = trained
    spec = dataclasses.replace(spec, eval_resize="resize")
    loaded = tf.saved_model.load(export.export_saved_model(net, spec, str(tmp_path),
                                                           max_pixels=100))
    default = loaded.signatures["serving_default"]
    assert default(images=tf.zeros([2, 10, 10, 1]))["probabilities"].shape == [2, 10]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"at most 100 pixels \(data.max_pixels\); received\] "
                             r"\[10\] \[x\] \[11\] \[=\] \[110\]"):
        default(images=tf.zeros([1, 10, 11, 1]))


def test_stage_export_matches_that_stage(trained, tmp_path):
    _, spec, net, x = trained
    loaded = tf.saved_model.load(export.export_saved_model(net, spec, str(tmp_path),
                                                           stage=1))
    got = loaded.signatures["serving_default"](images=tf.constant(x))["probabilities"]
    np.testing.assert_allclose(got, _probabilities(net.deployed_model(1), x), atol=1e-5)
    # Stage 1 and stage 2 really differ, so the comparison tells them apart.
    assert np.abs(_probabilities(net.deployed_model(2), x) - got).max() > 1e-2


@pytest.mark.parametrize("stage", [0, 3, "1"])
def test_bad_stage_is_rejected(trained, tmp_path, stage):
    _, spec, net, _ = trained
    root = tmp_path / "models"
    with pytest.raises(KgreedyError, match="^stage: "):
        export.export_saved_model(net, spec, str(root), stage=stage)
    assert not root.exists()


# --------------------------------------------------------------- versions ----

@pytest.mark.slow
def test_versions_count_up_and_are_never_overwritten(trained, tmp_path):
    _, spec, net, _ = trained
    root = tmp_path / "a" / "b"  # parents are created
    assert export.export_saved_model(net, spec, str(root)) == str(root / "1")
    assert export.export_saved_model(net, spec, str(root)) == str(root / "2")
    assert versions.existing_versions(str(root)) == [1, 2]
    before = _tree(root)
    marker = root / "1" / "saved_model.pb"
    mtime = marker.stat().st_mtime_ns
    with pytest.raises(KgreedyError) as info:
        export.export_saved_model(net, spec, str(root), version=1)
    assert str(info.value).startswith(
        f"version: version 1 already exists in {root}; exported versions are never "
        "overwritten")
    assert _tree(root) == before and marker.stat().st_mtime_ns == mtime
    assert _tmp_dirs(root) == []


@pytest.mark.slow
def test_next_version_ignores_non_versions(trained, tmp_path):
    _, spec, net, _ = trained
    for name in ("3", "10", ".tmp-40-abc", "abc", "0"):
        (tmp_path / name).mkdir()
    (tmp_path / "77").write_text("a file, not a version")
    assert versions.existing_versions(str(tmp_path)) == [3, 10]
    assert export.export_saved_model(net, spec, str(tmp_path)) == str(tmp_path / "11")
    assert export.export_saved_model(net, spec, str(tmp_path), version=5) == str(
        tmp_path / "5")


@pytest.mark.parametrize("version", [0, -1, True, "2", 1.0])
def test_bad_version_is_rejected(trained, tmp_path, version):
    _, spec, net, _ = trained
    with pytest.raises(KgreedyError, match="version: must be a positive integer"):
        export.export_saved_model(net, spec, str(tmp_path / "models"), version=version)
    assert not (tmp_path / "models").exists()


class _Broken:
    """Stands in for the ExportArchive: writes part of a model, then fails."""

    def write_out(self, path, **kwargs):
        with open(os.path.join(path, "saved_model.pb"), "w") as f:
            f.write("half")
        raise RuntimeError("disk full")


def test_failed_write_leaves_nothing(trained, tmp_path, monkeypatch):
    _, spec, net, _ = trained
    monkeypatch.setattr(export, "_build_archive", lambda model, spec, *limit: _Broken())
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_saved_model(net, spec, str(tmp_path))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_failed_rename_leaves_nothing(trained, tmp_path, monkeypatch):
    _, spec, net, _ = trained
    export.export_saved_model(net, spec, str(tmp_path))
    before = _tree(tmp_path)

    def rename(src, dst):
        assert os.path.isfile(os.path.join(src, "saved_model.pb"))  # written whole first
        raise OSError("rename failed")

    monkeypatch.setattr(export.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        export.export_saved_model(net, spec, str(tmp_path))
    assert _tree(tmp_path) == before and _tmp_dirs(tmp_path) == []


# -------------------------------------------------------------------- CLI ----

@pytest.fixture(scope="module")
def run_dir(trained, tmp_path_factory):
    """A run directory as the training engine writes it, with both stages saved."""
    recipe, spec, net, _ = trained
    root = str(tmp_path_factory.mktemp("run"))
    run = rundir.RunDir(root)
    with open(run.recipe, "w", encoding="utf-8") as f:
        json.dump(recipe.to_dict(), f)
    data.save_spec(spec, run.dataset)
    for stage in (1, 2):
        tf.train.CheckpointManager(rundir.stage_checkpoint(net, stage),
                                   run.checkpoints(stage), max_to_keep=2).save()
    with open(run.summary, "w", encoding="utf-8") as f:  # both stages finished
        json.dump({"stages": [{"stage": 1}, {"stage": 2}], "final": None}, f)
    return root


@pytest.mark.slow
def test_cli_exports_restored_weights(trained, run_dir):
    _, _, net, x = trained
    proc = subprocess.run([sys.executable, "-m", "kgreedy.export", run_dir, "--stage", "2"],
                          env=ENV, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version_dir = os.path.join(run_dir, "export", "t", "1")
    assert proc.stdout.strip().splitlines()[-1] == version_dir
    assert os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
    loaded = tf.saved_model.load(version_dir)
    got = loaded.signatures["serving_default"](images=tf.constant(x))["probabilities"]
    np.testing.assert_allclose(got, _probabilities(net.deployed_model(2), x), atol=1e-5)


def test_cli_stage_and_version_in_process(trained, run_dir, capsys):
    _, _, net, x = trained
    assert cli.run(export_cli.main, [run_dir, "--stage", "1", "--version", "7"]) == 0
    version_dir = os.path.join(run_dir, "export", "t", "7")
    assert capsys.readouterr().out.strip() == version_dir
    loaded = tf.saved_model.load(version_dir)
    assert int(loaded.max_pixels[0].numpy()) == 4096  # the run's data.max_pixels
    got = loaded.signatures["serving_default"](images=tf.constant(x))["probabilities"]
    np.testing.assert_allclose(got, _probabilities(net.deployed_model(1), x), atol=1e-5)


@pytest.mark.parametrize("args, needle", [
    (["--version", "0"], "--version"),
    (["--version", "x"], "--version"),
    (["--version", "-3"], "--version"),
    (["--stage", "9"], "--stage"),
    (["--stage", "x"], "--stage"),
    (None, "RUN_DIR"),
])
def test_cli_bad_input_exits_2_and_creates_nothing(run_dir, tmp_path, capsys, args, needle):
    if args is None:
        argv = [str(tmp_path / "missing")]
    else:
        argv = [run_dir, *args]
    before = _tree(run_dir)
    with pytest.raises(SystemExit) as info:
        cli.run(export_cli.main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("kgreedy: error:"), err
    assert needle in err
    assert _tree(run_dir) == before
    assert not (tmp_path / "missing").exists()


# ------------------------------------------------- input checks in the graph ----

def _message(error):
    return error.value.message


@pytest.mark.parametrize("shape, dtype", [([8, 8, 1], tf.float32), ([1, 8, 8, 3], tf.float32),
                                          ([1, 8, 8], tf.float32), ([1, 1, 8, 8, 1], tf.float32)])
def test_serving_default_rejects_wrong_rank_and_channels(exported, shape, dtype):
    _, loaded = exported
    # A loaded signature function does not check its TensorSpec (nor does TF Serving):
    # the check inside the graph must, naming the input.
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        loaded.signatures["serving_default"](images=tf.zeros(shape, dtype))
    assert "Shape of tensor images" in _message(info)
    assert "expected shape [?,8,8,1]" in _message(info)


@pytest.mark.parametrize("dtype", [tf.int32, tf.float64, tf.uint8])
def test_serving_default_rejects_wrong_dtype(exported, dtype):
    _, loaded = exported
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor"):
        loaded.signatures["serving_default"](images=tf.zeros([1, 8, 8, 1], dtype))


def test_serve_encoded_rejects_scalar_and_non_strings(exported):
    _, loaded = exported
    fn = loaded.signatures["serve_encoded"]
    png = tf.io.encode_png(tf.zeros([8, 8, 1], tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        fn(image_bytes=png)  # one image, not a batch of one
    assert "Shape of tensor image_bytes [] is not compatible with expected shape [?]" in \
        _message(info)
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a string"):
        fn(image_bytes=tf.zeros([1]))


@pytest.mark.parametrize("eval_resize", ["none", "resize_crop"])
def test_empty_batch_gets_empty_outputs(trained, tmp_path, eval_resize):
    _, spec, net, _ = trained
    spec = dataclasses.replace(spec, eval_resize=eval_resize)
    loaded = tf.saved_model.load(export.export_saved_model(net, spec, str(tmp_path)))
    for name, kwargs in [("serving_default", {"images": tf.zeros([0, 8, 8, 1])}),
                         ("serve_encoded", {"image_bytes": tf.zeros([0], tf.string)})]:
        out = loaded.signatures[name](**kwargs)
        assert {k: (v.dtype, v.shape.as_list()) for k, v in out.items()} == {
            "probabilities": (tf.float32, [0, 10]), "class_ids": (tf.int64, [0]),
            "class_names": (tf.string, [0])}, name


def test_class_names_are_kept_beside_the_signatures(trained, exported):
    _, spec, _, _ = trained
    _, loaded = exported
    assert [n.decode() for n in loaded.class_names[0].numpy()] == list(spec.class_names)


# ---------------------------------------------------------------- warm-up ----

@pytest.mark.slow
def test_every_version_has_warmup_written_before_the_rename(trained, tmp_path, monkeypatch):
    _, spec, net, _ = trained
    root = tmp_path / "mymodel"
    rename = os.rename
    seen = []

    def checking_rename(src, dst):
        seen.append(os.path.isfile(os.path.join(src, warmup_file.WARMUP_FILE)))
        rename(src, dst)

    monkeypatch.setattr(export.os, "rename", checking_rename)
    for version in (1, 2):
        path = export.export_saved_model(net, spec, str(root))
        assert os.path.getsize(os.path.join(path, warmup_file.WARMUP_FILE)) > 0
    assert seen == [True, True]


# --------------------------------------------------------- keep_versions ----

@pytest.mark.slow
def test_keep_versions_prunes_the_oldest(trained, tmp_path):
    _, spec, net, _ = trained
    for _ in range(3):
        export.export_saved_model(net, spec, str(tmp_path))
    (tmp_path / "notes").mkdir()  # not a version: left alone
    path = export.export_saved_model(net, spec, str(tmp_path), keep_versions=2)
    assert path == str(tmp_path / "4")
    assert versions.existing_versions(str(tmp_path)) == [3, 4]
    assert sorted(os.listdir(tmp_path)) == ["3", "4", "notes"]
    tf.saved_model.load(path)  # the new one is whole


@pytest.mark.slow
def test_keep_versions_never_deletes_the_version_just_written(trained, tmp_path):
    _, spec, net, _ = trained
    for version in (5, 6):
        export.export_saved_model(net, spec, str(tmp_path), version=version)
    path = export.export_saved_model(net, spec, str(tmp_path), version=2, keep_versions=1)
    assert path == str(tmp_path / "2")
    assert versions.existing_versions(str(tmp_path)) == [2, 6]


@pytest.mark.slow
def test_pruning_renames_away_before_deleting(trained, tmp_path, monkeypatch):
    _, spec, net, _ = trained
    for _ in range(2):
        export.export_saved_model(net, spec, str(tmp_path))
    (tmp_path / ".deleting-7-dead").mkdir()  # left by an interrupted prune
    rmtree = export.shutil.rmtree
    deleted = []

    def watching_rmtree(path, *args, **kwargs):
        # By the time anything is deleted, TF Serving no longer sees the version.
        assert not os.path.basename(path).isdigit()
        deleted.append((os.path.basename(path), versions.existing_versions(str(tmp_path))))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(export.shutil, "rmtree", watching_rmtree)
    assert versions.prune_versions(str(tmp_path), 1) == [1]
    assert deleted[0][0].startswith(".deleting-1-") and deleted[0][1] == [2]
    assert sorted(os.listdir(tmp_path)) == ["2"]


@pytest.mark.slow
def test_failed_pruning_warns_and_keeps_the_new_version(trained, tmp_path, monkeypatch):
    _, spec, net, _ = trained
    export.export_saved_model(net, spec, str(tmp_path))

    def failing_rmtree(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(export.shutil, "rmtree", failing_rmtree)
    with pytest.warns(UserWarning, match="deleting old versions failed"):
        path = export.export_saved_model(net, spec, str(tmp_path), keep_versions=1)
    assert path == str(tmp_path / "2") and versions.existing_versions(str(tmp_path)) == [2]


@pytest.mark.parametrize("keep", [0, -1, True, "2", 1.5])
def test_bad_keep_versions_is_rejected_before_writing(trained, tmp_path, keep):
    _, spec, net, _ = trained
    with pytest.raises(KgreedyError, match="keep_versions: must be a positive integer"):
        export.export_saved_model(net, spec, str(tmp_path / "models"), keep_versions=keep)
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_cli_keep_versions(run_dir, tmp_path, capsys):
    run_dir = shutil.copytree(run_dir, tmp_path / "run")  # the other CLI tests count versions
    root = os.path.join(run_dir, "export", "t")
    for _ in range(2):
        assert cli.run(export_cli.main, [str(run_dir), "--keep-versions", "1"]) == 0
    newest = capsys.readouterr().out.strip().splitlines()[-1]
    assert versions.existing_versions(root) == [int(os.path.basename(newest))]
    with pytest.raises(SystemExit) as info:
        cli.run(export_cli.main, [str(run_dir), "--keep-versions", "0"])
    assert info.value.code == 2
    assert "--keep-versions" in capsys.readouterr().err


@pytest.mark.slow
def test_ensemble_export_serves_the_weighted_heads(trained, tmp_path):
    _, spec, net, x = trained
    path = export.export_saved_model(net, spec, str(tmp_path / "ens"), heads="ensemble")
    out = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(x))
    # Heads 1 and 2 with the paper's weights 2^1, 2^2, normalised.
    logits = (2 * net.deployed_model(1)(x) + 4 * net.deployed_model(2)(x)) / 6
    np.testing.assert_allclose(out["probabilities"].numpy(), tf.nn.softmax(logits).numpy(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out["class_ids"].numpy(), np.argmax(logits, axis=-1))
    last = _probabilities(net.deployed_model(), x)
    assert not np.allclose(out["probabilities"].numpy(), last, atol=1e-3)
    with pytest.raises(KgreedyError, match=r"^heads: must be one of 'last', 'ensemble'"):
        export.export_saved_model(net, spec, str(tmp_path / "bad"), heads="all")


@pytest.mark.slow
def test_export_and_summaries_are_readable_by_other_users(trained, tmp_path):
    """mkdtemp/mkstemp make 0700/0600 entries; a TF Serving daemon running as another
    user must still read the export (umask 022 here: 0755 directories, 0644 files)."""
    from kgreedy.base.files import write_json

    _, spec, net, _ = trained
    old = os.umask(0o022)
    try:
        path = export.export_saved_model(net, spec, str(tmp_path / "perm"))
        write_json(str(tmp_path / "summary.json"), {"a": 1})
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o755
    assert os.stat(tmp_path / "summary.json").st_mode & 0o777 == 0o644
    pb = os.path.join(path, "saved_model.pb")
    assert os.stat(pb).st_mode & 0o044 == 0o044


# ------------------------------------------------------------ pixel limit ----

def _declaring(fmt, width, height):
    """A small real file of `fmt` whose header is patched to declare width x height
    (PNG with its IHDR CRC fixed): a decompression bomb's header without its body."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L" if fmt == "PNG" else "RGB", (8, 8)).save(buffer, fmt)
    raw = bytearray(buffer.getvalue())
    if fmt == "PNG":
        chunk = b"IHDR" + struct.pack(">II", width, height) + bytes(raw[24:29])
        raw[8:33] = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    elif fmt == "GIF":
        raw[6:10] = struct.pack("<HH", width, height)
    elif fmt == "BMP":
        raw[18:26] = struct.pack("<ii", width, -height)  # negative: a top-down BMP
    elif fmt == "JPEG":
        sof = raw.index(b"\xff\xc0")
        raw[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    elif fmt == "WEBP":
        assert raw[12:16] == b"VP8 "
        raw[26:30] = struct.pack("<HH", width, height)
    return bytes(raw)


@pytest.mark.parametrize("fmt, width, height", [
    ("PNG", 23000, 23000), ("GIF", 65535, 65535), ("BMP", 30000, 30000),
    ("JPEG", 60000, 60000), ("WEBP", 16383, 16383)])
def test_serve_encoded_refuses_a_header_above_max_pixels_before_decoding(
        exported, fmt, width, height):
    _, loaded = exported
    fn = loaded.signatures["serve_encoded"]
    good = tf.io.encode_png(tf.zeros([8, 8, 1], tf.uint8))
    assert fn(image_bytes=tf.stack([good]))["class_ids"].shape == [1]
    start = time.perf_counter()
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"header declares\] \[{width}\] \[x\] \[{height}\] \[=\] "
                             rf"\[{width * height}\] \[pixels, above the limit of "
                             r"64000000 \(data.max_pixels\)\]"):
        fn(image_bytes=tf.constant([good.numpy(), _declaring(fmt, width, height)]))
    assert time.perf_counter() - start < 5  # refused, not decoded


def test_export_keeps_its_max_pixels_and_predict_uses_it(trained, tmp_path, capsys):
    from kgreedy import predict

    _, spec, net, _ = trained
    path = export.export_saved_model(net, spec, str(tmp_path / "m"), max_pixels=63)
    loaded = tf.saved_model.load(path)
    assert int(loaded.max_pixels[0].numpy()) == 63
    png = tmp_path / "digit.png"  # 8x8 = 64 pixels
    png.write_bytes(tf.io.encode_png(tf.zeros([8, 8, 1], tf.uint8)).numpy())
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[64\] \[pixels, above the "
                                                             r"limit of 63"):
        loaded.signatures["serve_encoded"](image_bytes=tf.constant([png.read_bytes()]))
    assert cli.run(predict.main, [path, str(png)]) == 2
    assert capsys.readouterr().err == (
        f"kgreedy: error: {png}: not an image this model can read: its header declares "
        "8x8 = 64 pixels, above the limit of 63 (--max-pixels)\n")
    assert cli.run(predict.main, [path, str(png), "--max-pixels", "64"]) == 2  # signature
    assert "above the limit of 63" in capsys.readouterr().err
    with pytest.raises(KgreedyError, match="max_pixels: must be a positive integer"):
        export.export_saved_model(net, spec, str(tmp_path / "n"), max_pixels=0)


def test_predict_refuses_pipes_directories_and_bombs_in_one_line_each(
        exported, tmp_path, capsys):
    import threading

    from kgreedy import predict

    path, _ = exported
    pipe, folder, bomb = tmp_path / "pipe.png", tmp_path / "dir.png", tmp_path / "bomb.png"
    os.mkfifo(pipe)
    folder.mkdir()
    bomb.write_bytes(_declaring("PNG", 23000, 23000))
    opened, stop = [], threading.Event()

    def watch():  # lets an old-style reader blocked on the pipe go, and records it
        while not stop.is_set():
            try:
                fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.05)
                continue
            opened.append(1)
            os.close(fd)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        status = cli.run(predict.main, [path, str(pipe), str(folder), str(bomb)])
    finally:
        stop.set()
        thread.join(5)
    assert not opened, "the pipe was opened"
    assert status == 2
    assert capsys.readouterr().err.splitlines() == [
        f"kgreedy: error: {pipe}: not a regular file but a named pipe (FIFO)",
        f"kgreedy: error: {folder}: not a regular file but a directory",
        f"kgreedy: error: {bomb}: not an image this model can read: its header declares "
        "23,000x23,000 = 529,000,000 pixels, above the limit of 64,000,000 (--max-pixels)"]
