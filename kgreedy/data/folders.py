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
"""

import dataclasses
import os

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


def _subfolders(folder):
    return sorted(d for d in os.listdir(folder)
                  if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))


def _images_under(folder):
    """Image files anywhere below `folder`, sorted, hidden files and folders skipped."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(parent, f) for f in sorted(files) if is_image_name(f)]
    return found


def _class_files(folder, classes=None):
    """{class: [paths]} of a split folder; `classes` restricts and orders them."""
    names = _subfolders(folder)
    return {c: _images_under(os.path.join(folder, c)) for c in (classes or names)
            if c in names}


def _check_classes(where, files):
    if len(files) < 2:
        raise DataError("data.data_dir", f"{where} needs at least two class sub-folders "
                        "(one per class) holding images", sorted(files))
    empty = sorted(c for c, paths in files.items() if not paths)
    if empty:
        raise DataError("data.data_dir", f"class folders without {_EXTENSIONS} images "
                        f"in {where}", empty)


def _flatten(files, classes, origin):
    paths, labels = [], []
    for c, names in files.items():
        paths += names
        labels += [classes.index(c)] * len(names)
    return Split(tuple(paths), tuple(labels), origin)


def _hold_out(files, classes, fraction, seed, origin):
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
    return (_flatten(train, classes, f"{100 - fraction * 100:g}% of {origin}"),
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
        files = _class_files(root)
        _check_classes(root, files)
        classes = list(files)
        train, held = _hold_out(files, classes, eval_fraction, seed, "the class folders")
        return Layout(root, tuple(classes), train, held)

    train_dir = os.path.join(root, train_name)
    files = _class_files(train_dir)
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
    unknown = sorted(set(_subfolders(eval_dir)) - set(classes))
    if unknown:
        raise DataError("data.data_dir", f"{eval_dir} has classes that {train_name}/ "
                        "lacks", unknown)
    held = _flatten(_class_files(eval_dir, classes), classes, f"{eval_split}/")
    return Layout(root, tuple(classes), _flatten(files, classes, f"{train_name}/"), held)
