"""Choosing and configuring the tf.distribute strategy (`distribute.*`).

TensorFlow's own tf.distribute does all the distributing; this module only picks
the strategy, splits the CPU into logical devices when asked, and answers which
worker this process is.
"""

import json
import os

import tensorflow as tf

from kgreedy.base.errors import RecipeError


def configure_devices(config):
    """Splits the CPU into `config.logical_cpus` logical devices.

    Must run before TensorFlow initialises its devices (before the first op). A
    process that already has at least that many logical CPUs (a test session that
    split them at start) is left as it is.

    Raises:
        RecipeError: the devices are already initialised with fewer logical CPUs.
    """
    wanted = config.logical_cpus
    cpus = tf.config.list_physical_devices("CPU")
    have = tf.config.get_logical_device_configuration(cpus[0])
    if wanted <= max(len(have or ()), 1):
        return
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * wanted)
    except RuntimeError:
        raise RecipeError("distribute.logical_cpus", "TensorFlow has already initialised "
                          f"its devices with {max(len(have or ()), 1)} logical CPU(s); "
                          "set logical_cpus before any TensorFlow op runs", wanted) from None


def make_strategy(config):
    """Returns the strategy a recipe asks for.

    `auto` mirrors over all local GPUs when there are several (or over the logical
    CPUs when `logical_cpus` > 1), else uses the default strategy; `default` is the
    single-device default strategy; `mirrored` is MirroredStrategy over `devices`,
    else over the GPUs, else over the logical CPUs; `multi_worker` is
    MultiWorkerMirroredStrategy configured by the `TF_CONFIG` environment variable.

    Call `configure_devices(config)` first.
    """
    if config.strategy == "multi_worker":
        check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")][:config.logical_cpus]
    if config.strategy == "auto":
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy(gpus)
        if len(cpus) > 1:
            return tf.distribute.MirroredStrategy(cpus)
        return tf.distribute.get_strategy()
    if config.strategy == "default":
        return tf.distribute.get_strategy()
    devices = list(config.devices) if config.devices else (gpus or cpus)
    return tf.distribute.MirroredStrategy(devices)


def check_tf_config():
    """Validates `TF_CONFIG` for multi-worker training before TensorFlow reads it.

    Raises:
        RecipeError: TF_CONFIG is missing, not JSON, or lacks cluster/task.
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise RecipeError("distribute.strategy", "'multi_worker' needs the TF_CONFIG "
                          "environment variable (see docs/distributed.md)",
                          "multi_worker")
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RecipeError("TF_CONFIG", f"is not valid JSON ({e.msg})", raw) from None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    if not isinstance(task, dict) or "type" not in task or "index" not in task \
            or not isinstance(tf_config.get("cluster"), dict):
        raise RecipeError("TF_CONFIG", "needs {\"cluster\": {...}, \"task\": {\"type\": "
                          "..., \"index\": ...}}", raw)
    members = tf_config["cluster"].get(task["type"])
    if not isinstance(members, list) or not 0 <= task["index"] < len(members):
        raise RecipeError("TF_CONFIG", f"task {task['type']}:{task['index']} is not in "
                          "the cluster", raw)


class WorkerInfo:
    """Which worker of a (possibly multi-worker) strategy this process is.

    Attributes:
        is_chief: this process writes the run directory (checkpoints, summaries,
            export); the others write to temporary directories they remove.
        task: e.g. `worker:1`, or `local` without a cluster.
        num_workers: workers (input pipelines) in the cluster.
    """

    def __init__(self, strategy):
        resolver = getattr(strategy, "cluster_resolver", None)
        task_type = getattr(resolver, "task_type", None)
        if resolver is None or task_type is None:
            self.is_chief, self.task, self.num_workers = True, "local", 1
            return
        task_id = resolver.task_id
        cluster = resolver.cluster_spec().as_dict()
        self.num_workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
        self.task = f"{task_type}:{task_id}"
        self.is_chief = (task_type == "chief"
                         or (task_type == "worker" and task_id == 0 and "chief" not in cluster))
