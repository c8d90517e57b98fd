"""Image folders as people have them: finding the splits and classes, reading every
file once.

Accepted layouts under `data.data_dir` (class names are the sub-folder names, sorted):

- `train/` and one evaluation folder among `eval/`, `val/`, `validation/`, `test/`
  (or the folders named by `data.train_split` / `data.eval_split`);
- class folders directly under the root: `data.eval_fraction` of each class is held
  out for evaluation, stratified and seeded.

A `train/` without an evaluation folder beside it is refused rather than split: it
usually means the evaluation folder is missing or misnamed.

Images may sit in nested folders inside a class folder. Hidden files and folders
(names starting with `.`) and files without an image extension are ignored.

Symbolic links are followed, each real folder once: a link to a folder outside the
data directory, or a second path to a folder already listed (a link loop, or
`eval/cat -> ../train/cat`), is a `DataError` naming the link. Image files that
cannot be read as files (a named pipe, a device, a broken link) or whose names are
not UTF-8 are listed in their split's `bad`, never opened. A class folder whose name
is not UTF-8 is refused: it would be a class name.
"""

import dataclasses
import os
import stat

import numpy as np

from kgreedy.base.errors import DataError
from kgreedy.data.images import IMAGE_EXTENSIONS, is_image_name

EVAL_FOLDERS = ("eval", "val", "validation", "test")
_EXTENSIONS = "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)


@dataclasses.dataclass(frozen=True)
class Split:
    """One split's files: parallel tuples of paths and class ids, in a fixed order."""

    paths: tuple
    labels: tuple
    origin: str  # where the files came from, for messages: "val/", "20% of train/"
    bad: tuple = ()  # (path, reason) of image files left out unopened (`_file_problem`)

    def __len__(self):
        return len(self.paths)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The classes and the train and eval files of an image folder."""

    root: str
    classes: tuple
    train: Split
    eval: Split

    def describe(self):
        return (f"image_folder {self.root}: {len(self.classes)} classes; train "
                f"{len(self.train):,} files from {self.train.origin}, eval "
                f"{len(self.eval):,} files from {self.eval.origin}")


def check_not_empty(layout):
    """Raises `DataError` when the eval split has no images (found at load time, so
    that a layout can still be described)."""
    if not layout.eval.paths:
        raise DataError("data.data_dir", f"no {_EXTENSIONS} images in the evaluation "
                        f"folder {layout.eval.origin}", layout.root)


def printable(path):
    """`path` for messages and summary.json: bytes that are not UTF-8 (which Python
    holds as lone surrogates, and which cannot be printed or written as JSON) as
    `\\xNN` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(name):
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_SPECIAL = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
            (stat.S_ISDIR, "a directory"))


def file_problem(path):
    """Why `path` cannot be read as an image file, found without opening it (opening
    a named pipe blocks until something writes to it), or None for a regular file.

    Args:
        path: a file path (a symbolic link is followed).

    Returns:
        A reason in a few words, or None.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"cannot read: {e.strerror}"  # a broken link, a vanished file
    if stat.S_ISREG(mode):
        return None
    return "not a regular file but " + next(
        (what for test, what in _SPECIAL if test(mode)), "a special file")


def _subfolders(folder):
    return sorted(d for d in os.listdir(folder)
                  if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))


def _class_names(folder):
    names = _subfolders(folder)
    bad = [printable(os.path.join(folder, n)) for n in names if not _is_utf8(n)]
    if bad:
        raise DataError("data.data_dir", "class folder names must be UTF-8 text (each is "
                        "a class name, saved with the run and the export); rename", bad)
    return names


class _Walker:
    """Lists the folders of one layout, each real folder once and none outside the
    data directory (followed links included)."""

    def __init__(self, root):
        self.root = os.path.realpath(root)
        self.seen = {}  # (st_dev, st_ino) of every folder listed -> its path

    def enter(self, folder, ancestors=()):
        """Checks `folder` before it is listed; returns its (st_dev, st_ino)."""
        if os.path.islink(folder):
            real = os.path.realpath(folder)
            if os.path.commonpath([real, self.root]) != self.root:
                raise DataError("data.data_dir", f"the symbolic link {printable(folder)} "
                                f"leads out of the data directory {printable(self.root)}; "
                                "move or copy that folder into it, or point "
                                "data.data_dir at a folder that holds it", printable(
                                    os.readlink(folder)))
        info = os.stat(folder)
        key = (info.st_dev, info.st_ino)
        if key in self.seen:
            what = ("a symbolic link loop back to" if key in ancestors else
                    "a second path to")
            raise DataError("data.data_dir", f"{printable(folder)} is {what} "
                            f"{printable(self.seen[key])}, which is listed already (its "
                            "images would be read twice); remove the link",
                            printable(os.path.realpath(folder)))
        self.seen[key] = folder
        return key

    def images_under(self, folder):
        """(image files anywhere below `folder`, sorted, hidden files and folders
        skipped; [(path, reason)] of those that cannot be read as files)."""
        found, bad = [], []
        stack = [(folder, ())]  # depth first, in name order (not recursion: no depth limit)
        while stack:
            parent, ancestors = stack.pop()
            key = self.enter(parent, ancestors)
            try:
                entries = sorted(os.scandir(parent), key=lambda entry: entry.name)
            except OSError as e:
                raise DataError("data.data_dir", f"cannot list {printable(parent)}: "
                                f"{e.strerror}", printable(parent)) from None
            subfolders = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    subfolders.append(entry.path)
                elif is_image_name(entry.name):
                    reason = (None if _is_utf8(entry.path) else "its name is not UTF-8")
                    if reason is None and not entry.is_file():
                        reason = file_problem(entry.path)
                    if reason is None:
                        found.append(entry.path)
                    else:
                        bad.append((entry.path, reason))
            stack += [(d, ancestors + (key,)) for d in reversed(subfolders)]
        return found, bad


def _class_files(walker, folder, classes=None):
    """({class: [paths]} of a split folder, [(path, reason)] of its bad files);
    `classes` restricts and orders them."""
    walker.enter(folder)
    names = _class_names(folder)
    files, bad = {}, []
    for c in (classes or names):
        if c in names:
            files[c], unreadable = walker.images_under(os.path.join(folder, c))
            bad += unreadable
    return files, bad


def _check_classes(where, files):
    if len(files) < 2:
        raise DataError("data.data_dir", f"{where} needs at least two class sub-folders "
                        "(one per class) holding images", sorted(files))
    empty = sorted(c for c, paths in files.items() if not paths)
    if empty:
        raise DataError("data.data_dir", f"class folders without {_EXTENSIONS} images "
                        f"in {where}", empty)


def _flatten(files, classes, origin, bad=()):
    paths, labels = [], []
    for c, names in files.items():
        paths += names
        labels += [classes.index(c)] * len(names)
    return Split(tuple(paths), tuple(labels), origin, tuple(bad))


def _hold_out(files, classes, fraction, seed, origin, bad=()):
    """A stratified, seeded split of {class: paths} into (train, eval) `Split`s."""
    rng = np.random.default_rng(seed)
    train, held = {}, {}
    for c, paths in files.items():
        # At least one example of every class stays in train.
        n_eval = min(int(round(len(paths) * fraction)), len(paths) - 1)
        chosen = set(rng.permutation(len(paths))[:n_eval].tolist())
        held[c] = [p for i, p in enumerate(paths) if i in chosen]
        train[c] = [p for i, p in enumerate(paths) if i not in chosen]
    percent = f"{fraction * 100:g}%"
    # Bad files are no example of either split; train's pass reports them.
    return (_flatten(train, classes, f"{100 - fraction * 100:g}% of {origin}", bad),
            _flatten(held, classes, f"{percent} of {origin} (data.eval_fraction)"))


def find_layout(root, train_split=None, eval_split=None, eval_fraction=0.2, seed=0):
    """Finds the classes and the train and eval files under `root`, reading no pixels.

    Args:
        root: the folder (`data.data_dir`).
        train_split: the train folder's name (None: `train`, or the root itself
            when it holds class folders only).
        eval_split: the eval folder's name (None: the one of `EVAL_FOLDERS` present,
            else `eval_fraction` of the train files).
        eval_fraction: the share of each class held out when there is no eval folder.
        seed: seeds that hold-out.

    Returns:
        A `Layout`.

    Raises:
        DataError: the layout is not one of those accepted, with what was found.
    """
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise DataError("data.data_dir", "image_folder root does not exist", root)
    top = _subfolders(root)
    for key, name in (("data.train_split", train_split), ("data.eval_split", eval_split)):
        if name is not None and name not in top:
            raise DataError(key, f"no such folder in {root} (folders there: "
                            f"{', '.join(top) or 'none'})", name)
    train_name = train_split or ("train" if "train" in top else None)
    if train_name is None:
        splits = [n for n in EVAL_FOLDERS if n in top]
        if splits:
            raise DataError("data.data_dir", f"{root} has {'/, '.join(splits)}/ but no "
                            "train/ folder; name the train folder with data.train_split",
                            root)
        files, bad = _class_files(_Walker(root), root)
        _check_classes(root, files)
        classes = list(files)
        train, held = _hold_out(files, classes, eval_fraction, seed, "the class folders",
                                bad)
        return Layout(root, tuple(classes), train, held)

    train_dir = os.path.join(root, train_name)
    walker = _Walker(root)
    files, bad = _class_files(walker, train_dir)
    _check_classes(train_dir, files)
    classes = list(files)
    if eval_split is None:
        found = [n for n in EVAL_FOLDERS if n in top and n != train_name]
        if len(found) > 1:
            raise DataError("data.eval_split", f"{root} has several evaluation folders; "
                            "name the one to use with data.eval_split",
                            [f + "/" for f in found])
        eval_split = found[0] if found else None
    if eval_split is None:
        raise DataError("data.data_dir", f"no evaluation folder beside {train_name}/: "
                        f"none of {os.path.join(root, 'eval')}, val, validation, test "
                        "exists; add one, name it with data.eval_split, or put the class "
                        f"folders directly in {root} to hold out data.eval_fraction", root)
    eval_dir = os.path.join(root, eval_split)
    unknown = sorted(set(_class_names(eval_dir)) - set(classes))
    if unknown:
        raise DataError("data.data_dir", f"{eval_dir} has classes that {train_name}/ "
                        "lacks", unknown)
    eval_files, eval_bad = _class_files(walker, eval_dir, classes)
    held = _flatten(eval_files, classes, f"{eval_split}/", eval_bad)
    return Layout(root, tuple(classes), _flatten(files, classes, f"{train_name}/", bad), held)
