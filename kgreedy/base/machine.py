"""What this machine offers a run: the memory a process may still allocate, byte
counts as people read them, and the machine as the tools record it beside their
figures. No TensorFlow: the command line's fault messages use it after memory ran
out, when importing more would fail in turn."""

import os
import platform
import re

# Where the available memory is read (module constants: tests point them elsewhere).
MEMINFO = "/proc/meminfo"
PROC_CGROUP = "/proc/self/cgroup"
CGROUP_V2 = "/sys/fs/cgroup"
CGROUP_V1 = "/sys/fs/cgroup/memory"
# cgroup v1 writes "no limit" as a huge number (2^63 rounded down to a page).
_NO_LIMIT = 2 ** 60
CPUINFO = "/proc/cpuinfo"  # where the CPU's model name is read


def format_bytes(n):
    """1,536 -> '1.50 KB': three significant figures, in units of 1024 (as the dry
    run's MB of replay buffers), so that a refusal's two figures never read equal."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            break
        n /= 1024
    else:
        unit = "TB"
    if unit == "B":
        return f"{n:,.0f} B"
    return f"{n:,.{2 if n < 10 else 1 if n < 100 else 0}f} {unit}"


_UNITS = {"B": 0, "KB": 1, "MB": 2, "GB": 3, "TB": 4}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?B)\s*", re.IGNORECASE)


def parse_bytes(text):
    """'12GB' -> 12 * 1024**3: a size as people write it, in the units of
    `format_bytes` (B, KB, MB, GB, TB of 1024, any case, a space allowed before the
    unit); None when `text` is not such a size (a NaN, a bare number, 'lots')."""
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return None
    return int(float(match.group(1)) * 1024 ** _UNITS[match.group(2).upper()])


def is_budget(text):
    """Whether `text` is a memory budget: `parse_bytes`' sizes above 0, or "auto"."""
    return text == "auto" or bool(parse_bytes(text))


def available_bytes():
    """Bytes this process may still allocate: /proc/meminfo's MemAvailable, lowered
    to the cgroup's limit minus its usage (reclaimable page cache excluded) when that
    is less; None where neither is known."""
    known = [n for n in (_meminfo_available(), _cgroup_available()) if n is not None]
    return min(known) if known else None


def machine(**facts):
    """This machine as the tools record it in their JSON (docs/BENCHMARKS.md,
    docs/RESULTS.md): `{"cpu": model name, "cores": count, **facts}`.

    Args:
        **facts: what only the caller can tell, in the order it is recorded:
            library versions (`tensorflow=tf.__version__`), the GPU; base/ imports
            no TensorFlow.
    """
    return {"cpu": cpu_name(), "cores": os.cpu_count(), **facts}


def cpu_name():
    """The CPU's model name from /proc/cpuinfo, else what `platform` says of it."""
    for line in (_read(CPUINFO) or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _meminfo_available():
    for line in (_read(MEMINFO) or "").splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()  # "MemAvailable:   22471892 kB"
            if len(fields) > 1 and fields[1].isdigit():
                return int(fields[1]) * 1024
            return None
    return None


def _cgroup_dirs(root, controller):
    """This process's cgroup folder under `root` (from /proc/self/cgroup), then
    `root` itself (a container sees its own cgroup at the root)."""
    for line in (_read(PROC_CGROUP) or "").splitlines():
        _, names, path = (line.split(":", 2) + ["", ""])[:3]
        if controller in names.split(","):
            yield os.path.join(root, path.strip().lstrip("/"))
    yield root


def _cgroup_available():
    for root, controller, limit_name, usage_name, inactive in (
            (CGROUP_V2, "", "memory.max", "memory.current", "inactive_file"),
            (CGROUP_V1, "memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
             "total_inactive_file")):
        for folder in _cgroup_dirs(root, controller):
            limit = (_read(os.path.join(folder, limit_name)) or "").strip()
            usage = (_read(os.path.join(folder, usage_name)) or "").strip()
            if not (limit.isdigit() and usage.isdigit()):
                continue  # absent here, or "max": no limit at this level
            if int(limit) >= _NO_LIMIT:
                break
            stat = dict(line.split(None, 1) for line in
                        (_read(os.path.join(folder, "memory.stat")) or "").splitlines()
                        if " " in line)
            cache = int(stat.get(inactive, "0").strip() or 0)
            return max(int(limit) - max(int(usage) - cache, 0), 0)
    return None
