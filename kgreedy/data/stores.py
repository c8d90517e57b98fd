"""Examples addressable by index, in memory or on disk.

Shuffling a list of indices and loading each example only when it is drawn gives
every batch a uniform draw of the whole split, with a shuffle whose memory is one
integer per example, whatever the size of the images or feature maps behind them
(a tf.data shuffle buffer of images is neither uniform, once the split outgrows it,
nor small). `Examples` is a split seen that way; `PackedStore` holds arrays of one
dtype and channel count, of equal or differing height and width, back to back.
"""

import contextlib
import os
import tempfile

import numpy as np
import tensorflow as tf

from kgreedy.base.files import make_dirs, remove_empty_dirs


class PackedStore:
    """Arrays of one dtype appended one by one, then read back by index.

    In memory the arrays are one flat tensor, read with tensor slicing. On disk
    they are one flat file, `directory`/values.bin, read through `numpy.memmap`, so
    a split larger than memory costs no more than the pages the current batches
    touch.

    The file is written under a new name and renamed to values.bin by `finish`:
    an existing values.bin is never opened for writing, since truncating a file
    that another process has mapped kills that process (SIGBUS). `remove` deletes
    only the files this store wrote, and `directory` if it made it and it is then
    empty.

    Args:
        dtype: the numpy dtype of every array.
        channels: the last dimension of every array (arrays are [H, W, channels]).
        directory: where the store's files go; None keeps it in memory.
    """

    def __init__(self, dtype, channels, directory=None):
        self.dtype = np.dtype(dtype)
        self.channels = channels
        self.directory = directory
        self._chunks = []
        self._shapes = []
        self._offsets = [0]
        self._file = None
        self._made = []  # the directories this store made, outermost first
        self._written = None  # the file this store wrote, while it is ours to delete
        self._inode = None  # values.bin's, once renamed: still ours if it matches
        if directory is not None:
            make_dirs(directory, self._made)
            fd, self._written = tempfile.mkstemp(prefix="values.bin.", suffix=".partial",
                                                 dir=directory)
            self._file = os.fdopen(fd, "wb")
        self._flat = None
        self._memmap = None

    @property
    def in_memory(self):
        return self.directory is None

    @property
    def count(self):
        return len(self._shapes)

    @property
    def nbytes(self):
        return self._offsets[-1] * self.dtype.itemsize

    def append(self, array):
        """Adds one [H, W, channels] array (converted to the store's dtype)."""
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.ndim != 3 or array.shape[-1] != self.channels:
            raise ValueError(f"PackedStore holds [H, W, {self.channels}] arrays; "
                             f"received shape {array.shape}")
        if self._file is not None:
            self._file.write(array.tobytes())
        else:
            self._chunks.append(array.reshape(-1))
        self._shapes.append(array.shape)
        self._offsets.append(self._offsets[-1] + array.size)

    def extend(self, arrays):
        """Adds every array of a batch [N, H, W, channels]."""
        for array in arrays:
            self.append(array)

    def finish(self):
        """Ends writing; the store can then be read. Returns self."""
        if self._file is not None:
            self._file.close()
            self._file = None
            size = self._offsets[-1]
            # Mapped before the rename, so the map is of this store's own file whatever
            # later happens to the name; np.memmap cannot map an empty file.
            self._memmap = (np.memmap(self._written, dtype=self.dtype, mode="r",
                                      shape=(size,))
                            if size else np.zeros([0], self.dtype))
            values = os.path.join(self.directory, "values.bin")
            os.replace(self._written, values)
            self._written = values
            self._inode = os.stat(values).st_ino
        else:
            flat = np.concatenate(self._chunks) if self._chunks else np.zeros([0], self.dtype)
            self._chunks = []
            self._flat = tf.constant(flat)
        self._offsets_t = tf.constant(np.array(self._offsets, np.int64))
        self._shapes_t = tf.constant(np.array(self._shapes, np.int32).reshape(-1, 3))
        shapes = set(self._shapes)
        self._static_shape = (tuple(shapes.pop()) if len(shapes) == 1
                              else (None, None, self.channels))
        return self

    def read(self, index):
        """The array at `index` (a scalar int64 tensor), in TensorFlow ops."""
        start, end = self._offsets_t[index], self._offsets_t[index + 1]
        if self._memmap is not None:
            flat = tf.numpy_function(self._read_disk, [start, end], tf.as_dtype(self.dtype),
                                     stateful=False)
        else:
            flat = self._flat[start:end]
        array = tf.reshape(flat, self._shapes_t[index])
        array.set_shape(self._static_shape)
        return array

    def _read_disk(self, start, end):
        return np.array(self._memmap[int(start):int(end)])

    def remove(self):
        """Frees the arrays and deletes the files this store wrote, then the
        directories it made, those that are empty. Idempotent."""
        self._flat = self._memmap = None
        self._chunks = []
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._written is not None:
            with contextlib.suppress(FileNotFoundError):
                if self._inode is None or os.stat(self._written).st_ino == self._inode:
                    os.unlink(self._written)
            self._written = self._inode = None
        remove_empty_dirs(self._made)  # not one that holds another writer's files


class Examples:
    """A split as `count` (image, label) pairs loaded by index.

    Args:
        labels: int32 labels, one per example.
        load: `load(index)`: the image of example `index` (scalar int64 tensor) as
            a float32 tensor, in TensorFlow ops.
        store: the `PackedStore` behind `load`, if any (freed by `remove`).
    """

    def __init__(self, labels, load, store=None):
        self.labels = np.asarray(labels, np.int32)
        self.load = load
        self.store = store
        self._labels_t = tf.constant(self.labels)

    @property
    def count(self):
        return len(self.labels)

    @classmethod
    def from_store(cls, store, labels):
        """Examples whose images are a `PackedStore`'s arrays, as float32."""
        return cls(labels, lambda index: tf.cast(store.read(index), tf.float32), store)

    @classmethod
    def from_arrays(cls, images, labels):
        """Examples of an in-memory array [N, H, W, C]."""
        images = tf.constant(np.asarray(images, np.float32))
        return cls(labels, lambda index: tf.gather(images, index))

    def example(self, index):
        """(image, label) of example `index` (a scalar int64 tensor)."""
        return self.load(index), tf.gather(self._labels_t, index)

    def take(self, indices):
        """A dataset of (image, label) for a dataset of int64 `indices`."""
        return indices.map(self.example, num_parallel_calls=tf.data.AUTOTUNE)

    def ordered(self):
        """Every example, in index order."""
        return self.take(tf.data.Dataset.range(self.count))

    def sample_indices(self, count, seed):
        """Up to `count` distinct indices drawn uniformly with `seed`, in drawn order."""
        rng = np.random.default_rng(seed)
        return rng.permutation(self.count)[:count]

    def remove(self):
        if self.store is not None:
            self.store.remove()


def ordered(split):
    """A split (`Examples` or a `tf.data.Dataset`) as a dataset of (image, label) in
    its fixed order."""
    return split.ordered() if isinstance(split, Examples) else split


class HasSplits:
    """`train_source` and `eval_source` of a class holding `train_split` and
    `eval_split` (`Examples` or streams): the examples in their fixed order."""

    @property
    def train_source(self):
        """The train examples, in their fixed order, untransformed."""
        return ordered(self.train_split)

    @property
    def eval_source(self):
        """The eval examples, in their fixed order, untransformed."""
        return ordered(self.eval_split)
