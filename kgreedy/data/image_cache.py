"""Reading an image folder's files once: decode, prepare, keep, and leave out bad files.

Every file of a split is decoded in one pass before training. A file that cannot
be read or decoded, whose header declares more than `data.max_pixels` pixels (refused
before decoding), or that the folder listing found unreadable (a named pipe, a name
that is not UTF-8: `folders.Split.bad`, never opened) is left out (counted, and named in the progress output and
summary.json) or, with `data.bad_files: error`, stops the run naming it. The
prepared images (decoded and brought near the model's size, as uint8) are kept for
the run (`data.cache`): in memory, or on disk in the run directory, so later
epochs do no JPEG/PNG work. With `data.cache: none` the pass only checks the files,
and every epoch decodes them again.
"""

import dataclasses
import os
import shutil
import tempfile
import time
import warnings

import numpy as np
import tensorflow as tf

from kgreedy.base.errors import DataError
from kgreedy.data import folders
from kgreedy.data import transforms
from kgreedy.data.images import decode_image, size_problem
from kgreedy.data.stores import Examples, PackedStore

SHOWN_BAD_FILES = 5  # names of left-out files shown in messages and summary.json
_UPDATE_SECONDS = 1.0


def _decode_error(path, channels, max_pixels):
    """Why `path` cannot be read or decoded, in one line: the pixel limit's reason,
    else TensorFlow's."""
    problem = folders.file_problem(path)  # it may have changed since the listing
    if problem is not None:
        return problem
    try:
        contents = tf.io.read_file(path)
        problem = size_problem(contents, max_pixels)
        if problem is not None:
            return problem
        decode_image(contents, channels, max_pixels)
    except tf.errors.OpError as e:
        return e.message.strip().splitlines()[0]
    return "unreadable"  # read again fine: the file changed during the pass


def read_split(name, split, root, channels, prepare, cache, directory=None,
               bad_files="skip", progress=None, max_pixels=None):
    """Decodes every file of `split` once.

    Args:
        name: the split's name in messages (`train`, `eval`).
        split: a `folders.Split`.
        root: the image folder, to show paths relative to it.
        channels: decoded channels (1 or 3).
        prepare: `prepare(uint8 image) -> uint8 image`, in TensorFlow ops.
        cache: `memory`, `disk` or `none`.
        directory: the disk cache's folder (with `disk`).
        bad_files: `skip` or `error`.
        progress: a `Progress` for the pass's live line, or None.
        max_pixels: `data.max_pixels` (None: no limit).

    Returns:
        (`stores.Examples` of the good files, [relative paths of the files left out]).

    Raises:
        DataError: a file cannot be decoded and `bad_files` is `error`, or no file
            of the split can be decoded.
    """
    if bad_files == "error" and split.bad:
        path, reason = split.bad[0]
        raise DataError("data.bad_files", f"cannot read {folders.printable(path)} "
                        f"({reason}); set data.bad_files to skip to leave such files "
                        "out", "error")
    paths = np.array(split.paths)
    labels = np.array(split.labels, np.int32)
    store = None
    if cache != "none":
        store = PackedStore(np.uint8, channels, directory if cache == "disk" else None)

    def decode(index, path):
        return index, prepare(decode_image(tf.io.read_file(path), channels, max_pixels))

    # A file that fails drops out of the stream; the indices that came through tell
    # which did.
    ds = (tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64), paths))
          .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .ignore_errors()
          .prefetch(tf.data.AUTOTUNE))
    good = np.zeros(len(paths), bool)
    count = 0
    start = last = time.perf_counter()
    try:
        for index, image in ds.as_numpy_iterator():
            if bad_files == "error" and index > count:
                break  # a file before this one failed: no need to read on
            good[index] = True
            count += 1
            if store is not None:
                store.append(image)
            now = time.perf_counter()
            if progress is not None and now - last > _UPDATE_SECONDS:
                last = now
                progress.status(f"  reading {name} images: {index + 1:,}/{len(paths):,} "
                                f"files, {(index + 1) / (now - start):,.0f} files/s")
    except BaseException:
        if store is not None:
            store.remove()
        raise
    bad = np.flatnonzero(~good)
    if bad_files == "error" and len(bad):
        if store is not None:
            store.remove()
        path = str(paths[bad[0]])
        raise DataError("data.bad_files", f"cannot decode {folders.printable(path)} "
                        f"({_decode_error(path, channels, max_pixels)}); set "
                        "data.bad_files to skip to leave such files out", "error")
    if len(bad) == len(paths):
        if store is not None:
            store.remove()
        raise DataError("data.data_dir", f"none of the {len(paths):,} {name} files "
                        f"from {split.origin} can be decoded, e.g. "
                        f"{folders.printable(str(paths[0]))} "
                        f"({_decode_error(str(paths[0]), channels, max_pixels)})", root)
    if store is not None:
        examples = Examples.from_store(store.finish(), labels[good])
    else:
        good_paths = tf.constant(paths[good])
        examples = Examples(labels[good], lambda i: tf.cast(prepare(decode_image(
            tf.io.read_file(tf.gather(good_paths, i)), channels, max_pixels)), tf.float32))
    skipped = [folders.printable(os.path.relpath(str(p), root))
               for p in [path for path, _ in split.bad] + list(paths[bad])]
    if progress is not None:
        kept = ("" if store is None else
                f", {store.nbytes / 2 ** 30:.2f} GiB kept "
                f"{'in memory' if store.in_memory else 'on disk in ' + directory}")
        progress.message(f"  read {good.sum():,} {name} images in "
                         f"{time.perf_counter() - start:.1f}s{kept}")
        if skipped:
            progress.warning(f"{len(skipped):,} {name} file(s) cannot be decoded and are "
                             f"left out: {', '.join(skipped[:SHOWN_BAD_FILES])}"
                             f"{' ...' if len(skipped) > SHOWN_BAD_FILES else ''}")
    return examples, skipped


_SIZE_SAMPLE = 32  # files whose headers estimate a split's kept size


def _kept_bytes(split, side, shrink_only, channels, max_pixels):
    """Estimated bytes of a split kept with its shorter side at `side` (never
    enlarged when `shrink_only`), from the image sizes in a few files' headers."""
    from PIL import Image  # reads the header only; the pixels are TensorFlow's job

    picks = np.linspace(0, len(split) - 1, min(_SIZE_SAMPLE, len(split))).astype(int)
    sizes = []
    for i in picks:
        if folders.file_problem(split.paths[i]) is not None:
            continue  # a pipe would block Image.open; read_split names it
        try:
            with warnings.catch_warnings():
                # Pillow's own limit (DecompressionBombWarning, then Error) is not
                # ours: data.max_pixels decides, in read_split.
                warnings.simplefilter("ignore")
                with Image.open(split.paths[i]) as image:
                    sizes.append(image.size)
        except (OSError, ValueError, TypeError, EOFError, Image.DecompressionBombError):
            continue  # a bad file: read_split will say so
    sizes = [(w, h) for w, h in sizes if 0 < w * h <= max_pixels]
    if not sizes:
        return len(split) * side * side * 4 / 3 * channels
    per_image = []
    for w, h in sizes:
        scale = side / min(w, h)
        scale = min(scale, 1.0) if shrink_only else scale
        per_image.append(round(w * scale) * round(h * scale) * channels)
    return len(split) * float(np.mean(per_image))


def _cache_mode(config, spec, layout):
    """`data.cache` resolved: `auto` keeps images in memory when their estimated size
    is within `data.cache_memory_mb`, else on disk."""
    if config.cache != "auto":
        return config.cache
    size, channels = spec.image_shape[0], spec.image_shape[2]
    if spec.eval_resize == "resize_crop":
        estimate = (_kept_bytes(layout.train, transforms.TRAIN_SIDE_FACTOR * size, True,
                                channels, config.max_pixels)
                    + _kept_bytes(layout.eval, size / spec.crop_fraction, False, channels,
                                  config.max_pixels))
    else:
        estimate = (len(layout.train) + len(layout.eval)) * size * size * channels
    return "memory" if estimate <= config.cache_memory_mb * 2 ** 20 else "disk"


def load_folder(config, spec, layout, cache_dir=None, progress=None):
    """Reads an image folder's train and eval files once (`read_split` each).

    Args:
        config: the recipe's `DataConfig`.
        spec: the `DatasetSpec` from `data.describe`.
        layout: the folder's `folders.Layout`.
        cache_dir: where a disk cache goes (default: a temporary folder, returned
            as `scratch` for the caller to remove).
        progress: a `Progress`, or None.

    Returns:
        (train `Examples`, eval `Examples`, the spec with the counts read, the
        summary's `data` entry, scratch folder or None).
    """
    folders.check_not_empty(layout)
    mode = _cache_mode(config, spec, layout)
    scratch = None
    if mode == "disk" and cache_dir is None:
        cache_dir = scratch = tempfile.mkdtemp(prefix="kgreedy-images-")
    if progress is not None:
        where = {"memory": "in memory", "disk": f"on disk in {cache_dir}",
                 "none": "not kept (decoded every epoch)"}[mode]
        progress.message(f"{layout.describe()}; decoded images {where}")
    channels = spec.image_shape[2]
    splits, skipped = [], {}
    try:
        for name, split in (("train", layout.train), ("eval", layout.eval)):
            examples, skipped[name] = read_split(
                name, split, layout.root, channels, transforms.prepare_function(spec, name), mode,
                None if cache_dir is None else os.path.join(cache_dir, name),
                config.bad_files, progress, config.max_pixels)
            splits.append(examples)
    except BaseException:
        for examples in splits:
            examples.remove()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    train, evals = splits
    spec = dataclasses.replace(spec, num_train=train.count, num_eval=evals.count)
    info = {"train_from": layout.train.origin, "eval_from": layout.eval.origin,
            "cache": mode,
            "skipped_files": sum(map(len, skipped.values())),
            "skipped_examples": [f for name in ("train", "eval")
                                 for f in skipped[name]][:SHOWN_BAD_FILES]}
    return train, evals, spec, info, scratch
