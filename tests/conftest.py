"""Session set-up shared by all tests.

The CPU is split into two logical devices before TensorFlow runs its first op, so
MirroredStrategy tests can run in this process without GPUs (a split cannot be
made later). Code on the default strategy uses the first device only. This happens
when the session starts, before collection imports the test files, in each process
that runs tests; pytest-xdist's controller runs none and never loads TensorFlow.

The suite runs in two processes (setup.cfg: pytest-xdist, one file per process at a
time). Each then gets one thread for TensorFlow's ops, as do the command lines its
tests start: two processes on two cores with two threads each only wait on each
other. The files that take longest go first, so neither process is left with a long
file at the end while the other idles.
"""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(_name, "1")

import pytest  # noqa: E402


def pytest_sessionstart(session):
    plugins = session.config.pluginmanager
    # pytest-xdist's controller runs no test. Loaded there, TensorFlow wrote its
    # start-up lines (ending, on a machine without a GPU, in CUDA's `failed call to
    # cuInit`: TensorFlow then runs on the CPU) into pytest's capture while it
    # loaded this file, and pytest printed them after the run's summary.
    if plugins.hasplugin("dsession"):
        return
    # Captured like a test's output: the lines go with the first test file's
    # collection report, shown if that fails.
    capture = plugins.getplugin("capturemanager")
    if capture:
        capture.resume_global_capture()
    try:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        if os.environ.get("PYTEST_XDIST_WORKER"):
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
    finally:
        if capture:
            capture.suspend_global_capture()

# Files by their time on 2 cores, longest first (measured with --durations).
# Starting every subprocess-heavy file at once oversubscribes the two cores: the suite
# took 21-22 min with the longest single tests first, 17 min without.
_LONGEST_FIRST = ["test_benchmark", "test_readme_commands", "test_local_objectives_commands",
                  "test_decoupled", "test_memory_commands", "test_memory_estimate", "test_faults",
                  "test_objectives_engine", "test_decoupled_commands", "test_architectures", "test_multiworker",
                  "test_budget", "test_fit_budget", "test_export", "test_tune",
                  "test_tune_objective", "test_recipe_cli",
                  "test_split_recipes", "test_network_commands", "test_api",
                  "test_folders", "test_serving", "test_probe_report", "test_quickstart",
                  "test_probe_report_modules", "test_modules_engine", "test_damaged_checkpoints",
                  "test_resume", "test_second_process",
                  "test_tune_modules", "test_resnets", "test_precision", "test_distribute", "test_cache",
                  "test_fault_lines", "test_hostile_files", "test_time_to_accuracy",
                  "test_precision_auto", "test_engine", "test_quiet", "test_data",
                  "test_memory", "test_hostile_recipes", "test_stage", "test_benchmark_folder",
                  "test_objectives"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    # A stable sort: the tests of a file keep their order.
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


@pytest.fixture(autouse=True)
def _float32_policy_after_each_test():
    """Every trainer sets Keras' global dtype policy, and `train.mixed_precision: auto`
    (the default) makes it bfloat16 on CPUs with AVX512-BF16 or AMX: reset it, so a
    later test in the same process that builds Keras layers itself gets float32."""
    yield
    import keras

    keras.mixed_precision.set_global_policy("float32")
