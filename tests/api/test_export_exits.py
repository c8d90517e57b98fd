"""`SplitNet.export(path, heads="early_exit", calibration_data=...)`: the Python API's
early-exit export, and what it refuses."""

import json

import numpy as np
import pytest
import tensorflow as tf

import kgreedy
from test_api import digits, tiny_net


def test_a_split_net_exports_early_exits_calibrated_on_the_data_given(tmp_path):
    net = tiny_net(at=["res1_add", "res1"])  # 3 modules, 3 heads
    path = net.export(tmp_path / "m" / "1", heads="early_exit",
                      calibration_data=digits(64, start=1500), max_accuracy_drop=5)
    plan = json.loads((tmp_path / "m" / "1" / "assets.extra" / "early_exit.json").read_text())
    assert plan["max_accuracy_drop"] == 5 and len(plan["thresholds"]) == 3
    assert plan["calibration"]["examples"] == plan["held_out"]["examples"] == 32
    x = next(iter(digits(16)))[0]
    loaded = tf.saved_model.load(path)
    served = loaded.signatures["serving_default"](images=x)
    assert set(served["exit_stage"].numpy()) <= {1, 2, 3}
    last = loaded.signatures["serving_thresholds"](images=x, thresholds=tf.ones([3]))
    np.testing.assert_allclose(last["probabilities"].numpy(),
                               tf.nn.softmax(net.deployed_model()(x, training=False)).numpy(),
                               atol=1e-5)


def test_early_exits_need_calibration_data_and_only_they_take_it(tmp_path):
    net = tiny_net()
    with pytest.raises(ValueError, match="`calibration_data` is needed with "
                                         "heads='early_exit'.*calibration_data=NoneType"):
        net.export(tmp_path / "m" / "1", heads="early_exit")
    with pytest.raises(ValueError, match="Received: heads='last', calibration_data="):
        net.export(tmp_path / "m" / "1", calibration_data=digits(8))
    assert not (tmp_path / "m").exists()


def test_a_fit_run_is_refused_early_exits_on_the_command_line(tmp_path, capsys):
    from kgreedy import cli, export

    net = tiny_net(batch_norm_momentum=0.5)
    run_dir = tmp_path / "fit"
    kgreedy.fit(net, digits(32), epochs_per_stage=1, run_dir=run_dir, verbose=0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        cli.run(export.main, [str(run_dir), "--heads", "early_exit"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "net.export(path, heads='early_exit'" in err
    assert not (run_dir / "export").exists()
