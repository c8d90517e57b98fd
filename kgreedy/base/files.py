"""Files: atomic writes (a temp file in the same directory, then a rename) and the
one JSON reader whose errors say which file and what is wrong with it."""

import errno
import json
import os
import tempfile

from kgreedy.base.errors import KgreedyError



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
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    except OSError as e:
        _name_file(e, path)
        raise
    try:
        with os.fdopen(fd, "wb" if binary else "w",
                       encoding=None if binary else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            _name_file(e, path)
        raise


def _name_file(error, path):
    """Makes the OSError `error` name `path` when it names no file: a failed write or
    flush (a full disk) names none, and the user needs to know which file it was."""
    if error.filename is None:
        error.filename = os.fspath(path)


def write_text(path, text):
    """Writes `text` to `path` atomically (see `write_atomic`)."""
    write_atomic(path, lambda f: f.write(text))


def write_json(path, obj):
    """Atomically writes `obj` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path, obj):
    """Appends one JSON line in one write (more only where the system writes less);
    a write that fails part-way (a full disk) is cut off again, so the file never
    ends in half a line."""
    data = (json.dumps(obj) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        _name_file(e, path)
        raise
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:  # a short write is followed by the one that fails (ENOSPC)
                written = os.write(fd, view)
                if not written:
                    raise OSError(errno.EIO, "write wrote nothing", os.fspath(path))
                view = view[written:]
        except OSError as e:
            os.ftruncate(fd, size)
            _name_file(e, path)
            raise
    finally:
        os.close(fd)


def read_json(path, key=None, kind="file"):
    """Reads one JSON file; a missing, unreadable or malformed file is a `KgreedyError`.

    Args:
        path: the file.
        key: what names the file to the user (a recipe key such as `base`, or a flag);
            default: the path itself.
        kind: what the file is, for the message (`recipe file`).

    Raises:
        KgreedyError: `<key>: <kind> not found; received <path>`, or a directory, or
            not valid JSON (with the line and column).
    """
    where, received = (str(path), ()) if key is None else (key, (str(path),))
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise KgreedyError(where, f"{kind} not found", *received) from None
    except IsADirectoryError:
        raise KgreedyError(where, f"{kind} path is a directory, not a JSON file",
                           *received) from None
    except json.JSONDecodeError as e:
        raise KgreedyError(where, f"is not valid JSON: {e.msg} at line {e.lineno} "
                           f"column {e.colno}", *received) from None


def read_jsonl(path, key):
    """Reads a JSON-lines file (metrics.jsonl) into its objects, blank lines skipped.

    Args:
        path: the file.
        key: what names the file to the user (a flag such as `RUN_DIR`).

    Raises:
        KgreedyError: a line is not valid JSON or not a JSON object (with its number).
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise KgreedyError(key, f"{os.path.basename(path)} line {number} is not "
                                   f"valid JSON ({e.msg})", str(path)) from None
            if not isinstance(record, dict):
                raise KgreedyError(key, f"{os.path.basename(path)} line {number} is not "
                                   "a JSON object", str(path))
            records.append(record)
    return records
