"""Atomic writes: a temp file in the same directory, then a rename."""

import json
import os
import tempfile


def umask_mode(mode=0o666):
    """`mode` less the process umask: what open() would give a new file.

    mkstemp/mkdtemp create 0600/0700 entries; renamed into place as they are, a
    summary or an export would be unreadable to another user (a TF Serving daemon).
    """
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def write_atomic(path, write, binary=False):
    """Calls `write(f)` on a temp file beside `path`, then renames it into place, so
    readers see the old file or the new one, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w",
                       encoding=None if binary else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text(path, text):
    """Writes `text` to `path` atomically (see `write_atomic`)."""
    write_atomic(path, lambda f: f.write(text))


def write_json(path, obj):
    """Atomically writes `obj` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path, obj):
    """Appends one JSON line; a line is written by one write call and flushed."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
