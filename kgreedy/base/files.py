"""Files: atomic writes (a temp file in the same directory, then a rename) and the
one JSON reader whose errors say which file and what is wrong with it.

JSON is read strictly (`loads`, `read_json`): NaN, Infinity, numbers too large to be
finite, over-long integers, duplicate keys, deep nesting, large files and text that
is not UTF-8 are refused in one line, since each reached a traceback or a silently
wrong run (issue 25). JSON is written strictly too: never `NaN`, which is not JSON.
"""

import errno
import json
import math
import os
import stat
import tempfile

from kgreedy.base.errors import KgreedyError

MAX_JSON_BYTES = 16 * 2**20  # a recipe is a few KB; a summary or tuning.json some KB
MAX_JSON_DEPTH = 100  # a recipe nests 5 levels; Python's parser overflows near 1,000
# Python refuses to convert more than 4,300 digits (CVE-2020-10735); no number of a
# recipe or run file needs 20.
MAX_INT_DIGITS = 100


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


def make_dirs(path, made):
    """Makes `path` and its missing parents, appending each folder this call makes to
    `made` (outermost first), so that the caller removes exactly those
    (`remove_empty_dirs`); a folder another process makes meanwhile is not one.

    Raises:
        OSError: as `os.mkdir`; `NotADirectoryError` naming a parent that is a file.
    """
    missing = []
    path = os.path.abspath(path)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            if not os.path.isdir(path):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                         path) from None
            continue  # another process made it: not ours to remove
        made.append(path)


def remove_empty_dirs(made):
    """Removes the folders `make_dirs` listed in `made`, innermost first, while they
    are empty (never what another process put there), and empties `made`."""
    for path in reversed(made):
        try:
            os.rmdir(path)
        except OSError:
            break  # not empty (or gone): its parents are not empty either
    made.clear()


def dumps(obj, **kwargs):
    """`obj` as valid JSON: a float that is not finite (an evaluation's NaN loss) is
    written as null, as JavaScript's JSON.stringify does, never as `NaN`, which no
    strict JSON reader accepts (this module's included)."""
    return json.dumps(_finite_or_null(obj), allow_nan=False, **kwargs)


def _finite_or_null(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def write_json(path, obj):
    """Atomically writes `obj` as indented JSON (see `dumps`)."""
    write_text(path, dumps(obj, indent=2) + "\n")


def append_jsonl(path, obj):
    """Appends one JSON line (see `dumps`) in one write (more only where the system
    writes less); a write that fails part-way (a full disk) is cut off again, so the
    file never ends in half a line."""
    data = (dumps(obj) + "\n").encode("utf-8")
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


class JsonRefused(ValueError):
    """JSON text that `loads` refuses: `path` is where in the document (a dotted JSON
    path, '' for the top), `problem` what is wrong, `text` the value as written."""

    def __init__(self, path, problem, text):
        self.path, self.problem, self.text = path, problem, text
        super().__init__(f"{path}: {problem}" if path else problem)

    @property
    def received(self):
        """The value as written, cut to 40 characters for a one-line message."""
        return self.text if len(self.text) <= 40 else self.text[:40] + "..."


class _Refused:
    """A value refused while parsing, left in its place so that `_check`, which knows
    the path, can name it (the parser's hooks do not know where they are)."""

    def __init__(self, problem, text):
        self.problem, self.text = problem, text


def _constant(name):
    return _Refused(f"{name} is not a JSON number (JSON has no NaN or Infinity)", name)


def _float(text):
    value = float(text)
    if math.isfinite(value):
        return value
    return _Refused("the number is too large to be finite", text)


def _int(text):
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        return _Refused(f"an integer of {digits} digits is too long (at most "
                        f"{MAX_INT_DIGITS})", text)
    return int(text)


def _object(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            return _Refused(f"the key {key!r} appears twice (which one is meant?)", key)
        obj[key] = value
    return obj


def _check(value):
    """Raises `JsonRefused` for the first refused value or a nesting deeper than
    `MAX_JSON_DEPTH`, in document order; walks without recursion."""
    stack = [(value, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, _Refused):
            raise JsonRefused(path, node.problem, node.text)
        if isinstance(node, (dict, list)):
            if depth >= MAX_JSON_DEPTH:  # the path would be 100 items long
                raise JsonRefused("", f"nested deeper than {MAX_JSON_DEPTH} levels",
                                  "[" if isinstance(node, list) else "{")
            if isinstance(node, dict):
                children = [(v, f"{path}.{k}" if path else k, depth + 1)
                            for k, v in node.items()]
            else:
                children = [(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node)]
            stack.extend(reversed(children))  # popped in document order


def loads(text):
    """Parses JSON text strictly.

    Refuses what Python's `json` lets through: NaN, Infinity and -Infinity (not
    JSON), a number too large to be finite (`1e400`), an integer of more than
    `MAX_INT_DIGITS` digits, a key twice in one object, nesting deeper than
    `MAX_JSON_DEPTH`.

    Raises:
        json.JSONDecodeError: the text is not JSON (with line and column).
        JsonRefused: the text is JSON that kgreedy refuses, naming where.
    """
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_float,
                           parse_int=_int, object_pairs_hook=_object)
    except RecursionError:  # Python's parser recurses: its limit comes first
        raise JsonRefused("", f"nested deeper than {MAX_JSON_DEPTH} levels",
                          text[:41]) from None
    _check(value)
    return value


def read_json(path, key=None, kind="file"):
    """Reads one JSON file strictly (see `loads`); a missing, unreadable, oversized,
    non-UTF-8 or malformed file is a `KgreedyError`.

    Args:
        path: the file.
        key: what names the file to the user (a recipe key such as `base`, or a flag);
            default: the path itself.
        kind: what the file is, for the message (`recipe file`).

    Raises:
        KgreedyError: `<key>: <kind> not found; received <path>`, or a directory, or
            not valid JSON (with the line and column), or a refused value (with its
            JSON path and the value, shortened).
    """
    where, received = (str(path), ()) if key is None else (key, (str(path),))
    try:
        # Opened without blocking and checked before reading: opening a named pipe
        # for reading would wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise KgreedyError(where, f"{kind} path is a directory, not a JSON file",
                                   *received)
            if not stat.S_ISREG(mode):
                raise KgreedyError(where, f"{kind} is not a regular file but "
                                   f"{_file_type(mode)}", *received)
            data = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise KgreedyError(where, f"{kind} not found", *received) from None
    except OSError as e:
        raise KgreedyError(where, f"{kind} cannot be read ({e.strerror})",
                           *received) from None
    if len(data) > MAX_JSON_BYTES:
        raise KgreedyError(where, f"{kind} is larger than {MAX_JSON_BYTES // 2**20} MiB",
                           *received)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KgreedyError(where, f"{kind} is not UTF-8 text (byte "
                           f"0x{data[e.start]:02x} at offset {e.start})",
                           *received) from None
    try:
        return loads(text)
    except json.JSONDecodeError as e:
        raise KgreedyError(where, f"is not valid JSON: {e.msg} at line {e.lineno} "
                           f"column {e.colno}", *received) from None
    except JsonRefused as e:
        message = str(e) if key is None else f"{path}: {e}"
        raise KgreedyError(where, message, e.received) from None


def _file_type(mode):
    """What a file that is not a regular file is, in words."""
    for test, words in ((stat.S_ISFIFO, "a named pipe"),
                        (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device")):
        if test(mode):
            return words
    return "a special file"


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
