"""Faults of the machine while the work runs, a lost worker, a full disk, exhausted
memory, found in the errors TensorFlow and Python raise and turned into one line
that says what happened and how to continue (docs/resume.md, "When a run stops").

`classify(error, ...)` returns a `kgreedy.base.errors.Fault` (`LostWorker`, `DiskFull`,
`OutOfMemory`) whose message is that line, or None for any other error, which then
propagates as it is (a traceback, exit status 1). `translated(...)` classifies what
leaves a block of work whose run directory and way to continue it knows (the train
front end's training); `kgreedy.cli.run` classifies whatever reaches it, for every
front end.

TensorFlow-free at import, as all of `kgreedy.base`: a TensorFlow error is known by
its class's module and name (`tensorflow.python.framework.errors_impl`), and one can
only exist once TensorFlow is imported.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import sys

from kgreedy.base.errors import DiskFull, KgreedyError, LostWorker, OutOfMemory, Stopped
from kgreedy.base.machine import format_bytes

_TF_ERRORS = "tensorflow.python.framework.errors_impl"

# What says that a collective was aborted because a peer went away. UNAVAILABLE is
# TensorFlow's status for an unreachable peer; its messages name the collective or
# the transport ("Collective ops is aborted by: Socket closed", "The following tasks
# are unhealthy (stopped sending heartbeats)"). Cancelled and aborted ops count only
# with the stronger hints: those codes have other causes.
_PEER_GONE = re.compile(r"collective|socket closed|unhealthy|heartbeat|connection reset|"
                        r"failed to connect|connect to all addresses|is down|"
                        r"coordination service", re.IGNORECASE)
_ABORTED_BY_PEER = re.compile(r"collective ops is aborted|unhealthy|heartbeat|"
                              r"socket closed", re.IGNORECASE)
_TASK = re.compile(r"/job:(\w+)(?:/replica:\d+)?/task:(\d+)")

_NO_SPACE = re.compile(r"no space left on device|disk quota exceeded", re.IGNORECASE)
_MEMORY = re.compile(r"\bOOM\b|out of memory|failed to allocate", re.IGNORECASE)
_TENSOR = re.compile(r"shape\s*\[([\d,\s]*)\]\s*and type (\w+)(?: on (\S+))?")
# Bytes per element of the dtype names TensorFlow's OOM messages use.
_DTYPE_BYTES = {"float": 4, "double": 8, "half": 2, "bfloat16": 2, "int8": 1, "uint8": 1,
                "int16": 2, "uint16": 2, "int32": 4, "uint32": 4, "int64": 8,
                "uint64": 8, "bool": 1, "complex64": 8, "complex128": 16,
                "qint8": 1, "quint8": 1, "qint32": 4}


def classify(error, *, run_dir=None, output_flag=None, resume=None, checkpoint=None,
             smaller=None, available_memory=None):
    """The `Fault` that `error` (or an error it was raised from) reports, or None.

    Args:
        error: an exception.
        run_dir: the directory the command writes; a full disk's path when the
            error names none.
        output_flag: the flag that chooses that directory (`--output`), if any.
        resume: called when a fault is found; returns the flag that continues the
            work (`--resume`), or None where rerunning the command as it is does
            (a tuning search, an export) or where nothing could be resumed yet.
        checkpoint: called when a fault is found; returns the checkpoint the work
            would continue from, or None.
        smaller: what to make smaller when memory runs out (default: the batch or
            the model).
        available_memory: called when memory ran out; returns the bytes the
            process may still allocate, or None where unknown.

    Returns:
        A `LostWorker`, `DiskFull` or `OutOfMemory` whose message is the line to
        print, or None: `error` is none of these (nor a `KgreedyError` or `Stopped`,
        which are reported already).
    """
    if isinstance(error, (KgreedyError, Stopped)):
        return None
    context = {"run_dir": run_dir, "output_flag": output_flag, "resume": resume,
               "checkpoint": checkpoint, "smaller": smaller,
               "available_memory": available_memory}
    for cause in _chain(error):
        message = _message(cause)
        if _is_disk_full(cause, message):
            return DiskFull(_disk_full(cause, message, context))
        if _is_out_of_memory(cause, message):
            return OutOfMemory(_out_of_memory(cause, message, context))
        if _is_lost_worker(cause, message):
            return LostWorker(_lost_worker(message, context))
    return None


@contextlib.contextmanager
def translated(**context):
    """Raises the `Fault` (`classify(error, **context)`) of a fault inside the block,
    from the original error; any other error passes unchanged."""
    try:
        yield
    except Exception as error:
        fault = classify(error, **context)
        if fault is None:
            raise
        raise fault from error


# ------------------------------------------------------------- recognising ----

def _chain(error):
    """`error`, then what it was raised from or while handling: a fault is often the
    first cause (a cleanup that failed after it, a library's wrapper around it)."""
    seen = set()
    while error is not None and id(error) not in seen and len(seen) < 8:
        seen.add(id(error))
        yield error
        error = error.__cause__ or (None if error.__suppress_context__
                                    else error.__context__)


def _tf_error(error, *names):
    """Whether `error` is one of TensorFlow's errors of these class names (any, when
    none are given)."""
    return any(c.__module__ == _TF_ERRORS and (not names or c.__name__ in names)
               for c in type(error).__mro__)


def _message(error):
    # A TensorFlow error's message without the `{{function_node ...}}` prefix.
    text = getattr(error, "message", None) if _tf_error(error) else None
    text = str(text if isinstance(text, str) else error)
    return re.sub(r"^\s*\{\{function_node [^}]*\}\}\s*", "", text)


def _is_disk_full(error, message):
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return _tf_error(error) and bool(_NO_SPACE.search(message))


def _is_out_of_memory(error, message):
    if isinstance(error, MemoryError):
        return True
    return _tf_error(error, "ResourceExhaustedError", "InternalError") \
        and bool(_MEMORY.search(message))


def _is_lost_worker(error, message):
    if _tf_error(error, "UnavailableError"):
        return bool(_PEER_GONE.search(message))
    return _tf_error(error, "CancelledError", "AbortedError", "DeadlineExceededError",
                     "InternalError", "FailedPreconditionError") \
        and bool(_ABORTED_BY_PEER.search(message))


# ---------------------------------------------------------------- messages ----

def _how_to_continue(context, who="the same command"):
    flag = context["resume"]() if context["resume"] else None
    text = f"rerun {who} with {flag}" if flag else f"run {who} again"
    newest = context["checkpoint"]() if context["checkpoint"] and flag else None
    return text + (f" (it continues from {newest})" if newest else "")


def _first_line(text, limit=120):
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _disk_full(error, message, context):
    path = None
    if isinstance(error, OSError):
        path = error.filename or error.filename2
    if path is None:
        # TensorFlow names the file first: "/run/checkpoints/stage2/ckpt-66.index; No
        # space left on device [Op:MergeV2Checkpoints]".
        for token in re.findall(r"(?<![\w:])(/[^\s;'\"\[\]{}]+)", message):
            if not token.startswith("/job:"):
                path = token.rstrip(":,.")
                break
    path = os.path.abspath(os.fsdecode(path or context["run_dir"] or os.getcwd()))
    # TensorFlow's temporary names: a checkpoint's shards in `ckpt-N_temp/`, a file
    # being written as `NAME.tempstate123`; removed by now, so name what they were for.
    path = re.sub(r"(?:_temp[^/]*/.*|\.tempstate\d+)$", "", path)
    quota = (getattr(error, "errno", None) == errno.EDQUOT
             or "quota" in message.lower())
    free = _free_bytes(path)
    where = (f"{format_bytes(free)} free on its filesystem now" if free is not None
             else "free space unknown")
    what = "disk quota exceeded" if quota else "disk full: no space left on device"
    elsewhere = (f" or move the run directory to a disk with room and pass its path "
                 f"as {context['output_flag']}" if context["output_flag"] else "")
    return (f"{what} writing {path} ({where}); nothing half-written is kept; free "
            f"space there{elsewhere}, then {_how_to_continue(context)}")


def _free_bytes(path):
    """Free bytes of the filesystem holding `path` (or its nearest existing folder:
    a partial file is removed by now); None where unknown."""
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _out_of_memory(error, message, context):
    tensor = _TENSOR.search(message)
    if tensor:
        dims = [int(d) for d in tensor.group(1).replace(" ", "").split(",") if d]
        dtype, device = tensor.group(2), _short_device(tensor.group(3))
        size = _DTYPE_BYTES.get(dtype, 4)
        for d in dims:
            size *= d
        need = (f"allocating a {dtype} tensor of shape [{','.join(map(str, dims))}] "
                f"({format_bytes(size)}) on {device or 'the device'} failed")
    else:
        device = None
        need = ("an allocation failed" + (f" ({_first_line(message, 80)})"
                                          if message and not isinstance(error, MemoryError)
                                          else " (MemoryError)"))
    have = _device_memory(device)
    if have is None:
        available = (context["available_memory"]()
                     if context["available_memory"] else None)
        have = (f"{format_bytes(available)} of memory available" if available is not None
                else "the memory available unknown")
    smaller = context["smaller"] or "a smaller batch or a smaller model"
    flag = context["resume"]() if context["resume"] else None
    newest = context["checkpoint"]() if context["checkpoint"] and flag else None
    resume = (f", or free memory and rerun the same command with {flag} (it continues "
              f"from {newest})" if newest else "")
    return f"out of memory: {need}, with {have}; use {smaller}{resume}"


def _short_device(device):
    """`/job:localhost/replica:0/task:0/device:CPU:0` -> `CPU:0`."""
    if not device:
        return None
    match = re.search(r"device:(\w+:\d+)", device)
    return match.group(1) if match else device


def _device_memory(device):
    """What an accelerator held at its peak, from TensorFlow (None for the CPU, or
    where TensorFlow cannot say)."""
    tf = sys.modules.get("tensorflow")
    if not device or device.startswith("CPU") or tf is None:
        return None
    try:
        peak = tf.config.experimental.get_memory_info(device)["peak"]
    except (ValueError, KeyError, AttributeError):
        return None
    return f"{format_bytes(peak)} in use on {device} at the peak"


def _cluster():
    """({(job, index): address}, this task's (job, index)) from TF_CONFIG; ({}, None)
    without one."""
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    except ValueError:
        return {}, None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    members = {}
    for job, addresses in (cluster.items() if isinstance(cluster, dict) else ()):
        for index, address in enumerate(addresses if isinstance(addresses, list) else ()):
            members[(job, index)] = address
    this = ((task.get("type"), task.get("index"))
            if isinstance(task, dict) and "type" in task else None)
    return members, this


def _name(member, members):
    job, index = member
    address = members.get(member)
    return f"{job} {index}" + (f" ({address})" if address else "")


def _lost_worker(message, context):
    members, this = _cluster()
    named = []
    for job, index in _TASK.findall(message):
        member = (job, int(index))
        if member != this and member not in named:
            named.append(member)
    reason = re.split(r"aborted by:\s*", message, maxsplit=1)[-1]
    reason = re.sub(r"^Error reported from /job:\S+:\s*", "", _first_line(reason))
    if named:
        lost = ("lost " + ", ".join(_name(m, members) for m in named)
                + (f" of {len(members)}" if members else "")
                + (": it stopped answering" if len(named) == 1
                   else ": they stopped answering"))
    else:
        lost = "lost a worker: a peer stopped answering"
    here = f"this is {_name(this, members)}" if this else "this worker"
    if not named and members:
        here += "; the cluster: " + ", ".join(_name(m, members) for m in members)
    again = _how_to_continue(context, who="every worker's command")
    return f"{lost} ({reason.rstrip(':')}); {here}; {again}"
