"""The peak memory of a stage, on the host and on the GPUs (docs/run-directory.md,
"Peak memory").

- Host: the kernel's high-water mark of this process's resident set (`VmHWM` in
  /proc/self/status). Writing "5" to /proc/self/clear_refs sets it back to the
  current RSS, so after a reset it is the peak since then. Where that is not possible
  (no /proc, no permission) the figure is the process's peak since it started, and
  `StagePeak.since` says so.
- GPU: TensorFlow's own allocator peak per visible GPU
  (`tf.config.experimental.get_memory_info`), reset with `reset_memory_stats`; the
  largest over the GPUs, None without one.
- CPU tensors: the same figure of TensorFlow's CPU allocator, which keeps it only
  when the process starts with TF_CPU_ALLOCATOR_USE_BFC=true (tools/memory_estimate.py
  sets it to hold the estimate against what the tensors took, without the runtime
  around them); otherwise it reads 0 and is left out.

No TensorFlow import: as `kgreedy.base.faults` does, the GPU part uses TensorFlow
only when the process has already imported it (a run has; without TensorFlow
nothing was allocated on a GPU through it), so base/ stays TensorFlow-free.
"""

import sys

try:
    import resource
except ImportError:  # not on Windows: the host peak is then unknown without /proc
    resource = None

# Where the host figures are read and reset (module constants: tests point them
# elsewhere).
STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"
MB = 2 ** 20  # the records' "MB": units of 1024, as `kgreedy.base.machine.format_bytes`


def reset_host_peak():
    """Sets this process's peak RSS (VmHWM) back to its current RSS.

    Returns:
        True when reset; False where the kernel does not offer it (no /proc, or
        writing clear_refs is not permitted): `host_peak_bytes` is then the peak
        since the process started.
    """
    try:
        # "5" resets the peak RSS only (proc(5), clear_refs); the page flags the
        # other values clear are left alone.
        with open(CLEAR_REFS, "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def host_peak_bytes():
    """This process's peak resident set in bytes since the last `reset_host_peak`
    (or since it started): VmHWM, else `getrusage`'s ru_maxrss (not reset by
    clear_refs, so since the start); None where neither is known."""
    try:
        with open(STATUS, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    fields = line.split()  # "VmHWM:   123456 kB"
                    if len(fields) > 1 and fields[1].isdigit():
                        return int(fields[1]) * 1024
                    break
    except OSError:
        pass  # no /proc: the rusage figure below
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; Linux: KiB


def _gpus():
    """(tf, ["GPU:0", ...]): TensorFlow if imported, and its visible logical GPUs."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return None, []
    return tf, [d.name.split("device:")[-1] for d in tf.config.list_logical_devices("GPU")]


def reset_gpu_peaks():
    """Resets TensorFlow's peak memory statistic of every visible GPU (none: nothing
    to do)."""
    tf, gpus = _gpus()
    for gpu in gpus:
        try:
            tf.config.experimental.reset_memory_stats(gpu)
        except ValueError:
            pass  # an allocator without statistics: `gpu_peak_bytes` skips it too


def gpu_peak_bytes():
    """The largest of TensorFlow's peak bytes over the visible GPUs since the last
    `reset_gpu_peaks` (or since TensorFlow started); None without a GPU, or where no
    GPU's allocator keeps statistics."""
    tf, gpus = _gpus()
    peaks = []
    for gpu in gpus:
        try:
            peaks.append(tf.config.experimental.get_memory_info(gpu)["peak"])
        except ValueError:
            continue
    return max(peaks) if peaks else None


def reset_cpu_tensor_peak():
    """Resets TensorFlow's CPU allocator peak (where it keeps one)."""
    tf = sys.modules.get("tensorflow")
    if tf is not None and cpu_tensor_peak_bytes() is not None:
        tf.config.experimental.reset_memory_stats("CPU:0")


def cpu_tensor_peak_bytes():
    """TensorFlow's CPU allocator peak in bytes since the last reset, or None where it
    keeps no statistics (the default allocator reads 0)."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return None
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    return peak or None


def _mb(n):
    return None if n is None else round(n / MB, 1)


class StagePeak:
    """The peak memory since a stage began: made when it begins (it resets the
    peaks), read at each epoch's end and at the stage's end.

    Attributes:
        since: "stage" where the host peak was reset, "process" where it could not
            be (the host figure is then the process's peak since it started).
    """

    KEYS = ("peak_memory_mb", "gpu_peak_memory_mb")

    def __init__(self):
        self.since = "stage" if reset_host_peak() else "process"
        reset_gpu_peaks()
        reset_cpu_tensor_peak()

    def read(self):
        """{"peak_memory_mb": host peak, "gpu_peak_memory_mb": GPU peak or None}, in
        MB of 2^20 bytes, one decimal; plus "cpu_tensor_peak_memory_mb" where
        TensorFlow's CPU allocator keeps statistics."""
        cpu = cpu_tensor_peak_bytes()
        return {"peak_memory_mb": _mb(host_peak_bytes()),
                "gpu_peak_memory_mb": _mb(gpu_peak_bytes()),
                **({} if cpu is None else {"cpu_tensor_peak_memory_mb": _mb(cpu)})}


def largest_peaks(*figures):
    """The largest of `figures` (dicts with `StagePeak.KEYS`) key by key, None values
    and missing keys ignored: a stage's peak over its epochs' records (and the CPU
    allocator's, where any figure has it)."""
    keys = [*StagePeak.KEYS, *(["cpu_tensor_peak_memory_mb"] if any(
        "cpu_tensor_peak_memory_mb" in f for f in figures) else [])]
    return {key: max((f[key] for f in figures if f.get(key) is not None), default=None)
            for key in keys}
