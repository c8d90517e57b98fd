"""TF Serving's versions below a model base path (MODEL_BASE/VERSION): listing them,
and pruning old ones without a server ever seeing half a version.

No TensorFlow: `kgreedy.predict` finds the newest version before it loads anything.
"""

import os
import re
import shutil
import uuid

from kgreedy.base.errors import KgreedyError

_VERSION_RE = re.compile(r"[0-9]+")  # ASCII only: str.isdigit also accepts '²'
_DELETING = ".deleting-"  # prefix of versions being pruned: not an integer, so ignored


def existing_versions(export_root):
    """Integer version directories below `export_root`, ascending (empty if none)."""
    if not os.path.isdir(export_root):
        return []
    return sorted(int(name) for name in os.listdir(export_root)
                  if _VERSION_RE.fullmatch(name) and int(name) > 0
                  and os.path.isdir(os.path.join(export_root, name)))


def check_keep_versions(keep_versions):
    """Raises KgreedyError unless `keep_versions` is a positive integer or None."""
    if keep_versions is not None and (isinstance(keep_versions, bool)
                                      or not isinstance(keep_versions, int)
                                      or keep_versions < 1):
        raise KgreedyError("keep_versions", "must be a positive integer or None",
                           keep_versions)


def prune_versions(export_root, keep_versions, protect=()):
    """Deletes all versions below `export_root` but the newest `keep_versions`.

    A version goes in two steps: it is renamed to a name that is not an integer
    (TF Serving then sees it vanish whole and unloads it), and only then deleted, so
    no server ever loads a half-deleted version. Leftovers of an interrupted prune
    (`.deleting-*`) are removed too.

    Args:
        export_root: TF Serving's model base path.
        keep_versions: how many of the newest versions to keep (>= 1).
        protect: versions never deleted whatever their number (the one just
            written, which may be older than others when `version` was given).

    Returns:
        The deleted versions, ascending.

    Raises:
        OSError: a version could not be renamed or deleted.
    """
    check_keep_versions(keep_versions)
    versions = existing_versions(export_root)
    keep = set(versions[-keep_versions:]) | set(protect)
    deleted = []
    for version in versions:
        if version in keep:
            continue
        doomed = os.path.join(export_root, f"{_DELETING}{version}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(os.path.join(export_root, str(version)), doomed)
        except FileNotFoundError:
            continue  # a concurrent prune took it
        shutil.rmtree(doomed)
        deleted.append(version)
    for name in os.listdir(export_root):
        if name.startswith(_DELETING):
            shutil.rmtree(os.path.join(export_root, name), ignore_errors=True)
    return deleted


def temporary_versions(export_root):
    """The temporary version directories (`.tmp-*`, paths) below an export root:
    an export writes its version there and renames it into place."""
    if not os.path.isdir(export_root):
        return set()
    return {os.path.join(export_root, name) for name in os.listdir(export_root)
            if name.startswith(".tmp-")}
