"""The README's main job end to end: train the quickstart in a subprocess, then serve
its export from a process that imports neither kgreedy nor keras."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from kgreedy import data
from kgreedy.training import rundir

pytestmark = pytest.mark.slow  # the quickstart, trained by its README command

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "kgreedy.train", str(ROOT / "recipes" / "quickstart.json"),
         "--output", str(out), "--set", "train.epochs_per_stage=5"],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_quickstart_trains_three_stages_and_reaches_90_percent(quickstart):
    out, stdout = quickstart
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == [1, 2, 3]
    assert summary["final"]["val_accuracy"] >= 0.9, summary["final"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 15
    assert json.loads((out / "recipe.json").read_text())["train"]["epochs_per_stage"] == 5
    export_path = Path(summary["final"]["export_path"])
    assert export_path == out / "export" / "quickstart" / "1"
    assert (export_path / "saved_model.pb").is_file()
    # Piped stdout: one line per epoch, no live carriage-return updates.
    assert "\r" not in stdout and stdout.count("stage 3 epoch") == 5


SERVE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    export, images_file, png_dir, result_file = sys.argv[1:]
    model = tf.saved_model.load(export)
    images = tf.constant(np.load(images_file))
    pngs = tf.constant([open(f"{png_dir}/{i}.png", "rb").read() for i in range(len(images))])
    raw = model.signatures["serving_default"](images=images)
    enc = model.signatures["serve_encoded"](image_bytes=pngs)
    assert "keras" not in sys.modules and "kgreedy" not in sys.modules
    json.dump({
        "raw_ids": raw["class_ids"].numpy().tolist(),
        "enc_ids": enc["class_ids"].numpy().tolist(),
        "raw_names": [n.decode() for n in raw["class_names"].numpy()],
        "prob_sum": raw["probabilities"].numpy().sum(axis=1).tolist(),
        "dtypes": [raw["probabilities"].dtype.name, raw["class_ids"].dtype.name,
                   raw["class_names"].dtype.name],
    }, open(result_file, "w"))
""")


def test_export_serves_both_signatures_without_keras(quickstart, tmp_path):
    out, _ = quickstart
    recipe, spec, net, stage = rundir.load_trained(out)
    assert stage == 3
    datasets = data.load(recipe.data, spec, batch_size=64, seed=recipe.seed)
    images = np.concatenate([x.numpy() for x, _ in datasets.eval])[:100]
    expected = np.argmax(net.deployed_model()(images, training=False), axis=-1)
    for i, image in enumerate(images):  # digits are integers 0..16: PNG is lossless
        (tmp_path / f"{i}.png").write_bytes(tf.io.encode_png(tf.cast(image, tf.uint8)).numpy())
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "serve.py").write_text(SERVE)
    # `import tensorflow` imports keras when it is installed; shadow both packages
    # with ones that refuse to import, so any use of them by the loader fails.
    for name in ("keras", "kgreedy"):
        (tmp_path / "blocked" / name).mkdir(parents=True)
        (tmp_path / "blocked" / name / "__init__.py").write_text(
            f"raise ImportError('{name} is blocked in this process')\n")
    export = json.loads((out / "summary.json").read_text())["final"]["export_path"]
    proc = subprocess.run([sys.executable, str(tmp_path / "serve.py"), export,
                           str(tmp_path / "images.npy"), str(tmp_path),
                           str(tmp_path / "result.json")],
                          capture_output=True, text=True, timeout=300,
                          env={**ENV, "PYTHONPATH": str(tmp_path / "blocked")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    np.testing.assert_array_equal(result["raw_ids"], expected)
    np.testing.assert_array_equal(result["enc_ids"], expected)
    assert result["raw_names"] == [spec.class_names[i] for i in expected]
    np.testing.assert_allclose(result["prob_sum"], 1.0, rtol=1e-5)
    assert result["dtypes"] == ["float32", "int64", "string"]
