"""`kgreedy.fit(..., memory_budget=...)`: docs/performance.md's Python example as
written (end to end refused in Keras' words, the same net trained greedily and
exported), a bad budget refused before any work, the batch size a refusal names
fits, and the optimizer's slots counted from the optimizer itself."""

import contextlib
import io
import re

import keras
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

import kgreedy
from kgreedy.training import budget
from test_api import ROOT, tiny_net


def performance_example():
    """docs/performance.md's one Python code block."""
    blocks = re.findall(r"^```python\n(.*?)^```",
                        (ROOT / "docs" / "performance.md").read_text("utf-8"), re.S | re.M)
    assert len(blocks) == 1, "docs/performance.md should hold one Python example"
    return blocks[0]


def test_the_documented_example_refuses_end_to_end_and_trains_greedily(tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    scope = {}
    with contextlib.redirect_stdout(out):
        exec(compile(performance_example(), "performance.md", "exec"), scope)  # noqa: S102
    printed = out.getvalue()
    # The figures its comment shows are the ones printed.
    assert "Stage 4 of this end_to_end fit needs about 18.2 MB (" in printed
    assert "more than the memory budget of 15.0 MB; what would fit: mode='greedy' (11.4 MB)" \
        in printed
    assert printed.rstrip().splitlines()[0].endswith(
        "Received: memory_budget='15MB', mode='end_to_end'")
    assert sorted(scope["history"].stages) == [1, 2, 3, 4]
    assert (tmp_path / "exports" / "digits_15mb" / "1" / "saved_model.pb").is_file()


@pytest.mark.parametrize("value", ["lots", "NaN", "12", "0MB"])
def test_a_budget_that_is_not_a_size_is_refused_before_any_work(tmp_path, value):
    with pytest.raises(ValueError) as error:
        kgreedy.fit(tiny_net(), digits(32), memory_budget=value, run_dir=tmp_path / "run",
                    verbose=0)
    assert str(error.value).startswith("`memory_budget` must be a size such as '12GB'")
    assert str(error.value).endswith(f"Received: memory_budget={value!r}")
    assert not (tmp_path / "run").exists()


def digits(count, batch=16):
    x, y = load_digits(return_X_y=True)
    x = x.reshape(-1, 8, 8, 1).astype("float32")[:count]
    return tf.data.Dataset.from_tensor_slices((x, y[:count])).batch(batch)


def test_the_batch_size_a_refusal_names_fits(tmp_path):
    net = tiny_net()
    with pytest.raises(ValueError) as error:
        kgreedy.fit(net, digits(64, batch=64), mode="decoupled", memory_budget="1.5MB",
                    verbose=0)
    named = re.search(r"batches of (\d+) images?\b", str(error.value))
    assert named, str(error.value)
    batch = int(named.group(1))
    assert 1 <= batch < 64
    with pytest.warns(UserWarning, match="BatchNormalization momentum"):  # one step
        kgreedy.fit(net, digits(batch, batch=batch), mode="decoupled",
                    memory_budget="1.5MB", epochs_per_stage=1, verbose=0)
    with pytest.raises(ValueError, match="more than the memory budget of 1.50 MB"):
        kgreedy.fit(net, digits(batch + 1, batch=batch + 1), mode="decoupled",
                    memory_budget="1.5MB", verbose=0)


def test_slots_are_counted_on_the_optimizer_itself():
    assert budget.optimizer_slots(lambda: keras.optimizers.SGD(0.1)) == 0
    assert budget.optimizer_slots(lambda: keras.optimizers.SGD(0.1, momentum=0.9)) == 1
    assert budget.optimizer_slots(lambda: keras.optimizers.Adam()) == 2


def test_a_net_fit_before_is_sized_as_a_fresh_one():
    """Greedy stages leave their modules frozen; a later fit trains them again, and
    its optimizer and gradients are sized on every trainable variable."""
    def need(net):
        with pytest.raises(ValueError) as error:
            kgreedy.fit(net, digits(64, batch=64), mode="decoupled", memory_budget="1KB",
                        verbose=0)
        return re.search(r"needs about (.*?) \(", str(error.value)).group(1)

    net = tiny_net()
    fresh = need(net)
    with pytest.warns(UserWarning, match="BatchNormalization momentum"):
        kgreedy.fit(net, digits(64, batch=64), epochs_per_stage=1, verbose=0)
    assert need(net) == fresh
