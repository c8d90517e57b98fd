"""Files: atomic writes (a temp file in the same directory, then a rename) and the
one JSON reader whose errors say which file and what is wrong with it."""

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
