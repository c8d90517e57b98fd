"""Image folders that a careless or hostile user may hand over (issue 25): symbolic
link loops and links out of the data directory, named pipes, names that are not
UTF-8, and images whose header declares more pixels than `data.max_pixels`."""

import contextlib
import io
import os
import signal
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

from kgreedy import data
from kgreedy.base.errors import DataError
from kgreedy.config.recipe import DataConfig
from kgreedy.data import folders


def write_png(path, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 40, 30)).save(path)
    return path


def classes(root, per_class=20, names=("cat", "dog")):
    for c in names:
        for i in range(per_class):
            write_png(root / c / f"{i}.png")


def config(root, **keys):
    return DataConfig(**{"source": "image_folder", "data_dir": str(root), "image_size": 8,
                         **keys})


def png_declaring(width, height):
    """A small, well-formed PNG (8x8 grey pixels) whose IHDR declares `width` x
    `height`, its CRC fixed: what a 1.6 MB PNG of 23000x23000 zeros says of itself."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    good = buffer.getvalue()
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return good[:8] + struct.pack(">I", 13) + chunk + struct.pack(
        ">I", zlib.crc32(chunk)) + good[33:]


@contextlib.contextmanager
def time_limit(seconds):
    """Fails the test (in the main thread) when its body runs longer than `seconds`:
    the old walk never ended on two loops."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def watched_fifo(path):
    """A named pipe at `path`; yields a list that records each time something opened
    it for reading. A reader blocked in open() is let go (the pipe is opened for
    writing and closed, so it reads an empty file): the old code hung there for ever."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    opened, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            try:
                # Succeeds only while a reader has the pipe open (ENXIO otherwise).
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.05)
                continue
            opened.append(time.time())
            os.close(fd)
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield opened
    finally:
        stop.set()
        thread.join(5)


# --------------------------------------------------------------- symlinks ----

def test_a_symlink_loop_is_refused_naming_it(tmp_path):
    classes(tmp_path)  # 40 files; the old walk turned them into 1,640
    os.symlink(".", tmp_path / "cat" / "loop")
    with pytest.raises(DataError, match=r"data.data_dir: .*cat/loop is a symbolic link "
                                        r"loop back to .*cat"):
        folders.find_layout(str(tmp_path))


def test_two_symlink_loops_are_refused_in_seconds(tmp_path):
    classes(tmp_path, per_class=2)
    os.symlink(".", tmp_path / "cat" / "a")
    os.symlink(".", tmp_path / "cat" / "b")
    with time_limit(10), pytest.raises(DataError, match="symbolic link loop"):
        folders.find_layout(str(tmp_path))


def test_a_class_folder_linked_out_of_the_data_directory_is_refused(tmp_path):
    root = tmp_path / "photos"
    classes(root / "train", per_class=2)
    classes(root / "val", per_class=1)
    classes(tmp_path / "elsewhere", per_class=2, names=("bird",))
    os.symlink(tmp_path / "elsewhere" / "bird", root / "train" / "bird")
    with pytest.raises(DataError, match=r"the symbolic link .*train/bird leads out of the "
                                        r"data directory .*received '.*elsewhere/bird'"):
        folders.find_layout(str(root))


def test_a_folder_listed_twice_is_refused_so_no_file_is_in_train_and_eval(tmp_path):
    classes(tmp_path / "train", per_class=2)
    (tmp_path / "val").mkdir()
    write_png(tmp_path / "val" / "dog" / "0.png")
    os.symlink(tmp_path / "train" / "cat", tmp_path / "val" / "cat")
    with pytest.raises(DataError, match=r"val/cat is a second path to .*train/cat"):
        folders.find_layout(str(tmp_path))


def test_links_inside_the_data_directory_are_followed(tmp_path):
    classes(tmp_path / "train", per_class=2)
    classes(tmp_path / "val", per_class=1)
    write_png(tmp_path / "extra" / "more.png")
    os.symlink(tmp_path / "extra", tmp_path / "train" / "cat" / "extra")  # a folder
    os.symlink(tmp_path / "train" / "dog" / "0.png", tmp_path / "train" / "cat" / "x.png")
    layout = folders.find_layout(str(tmp_path))
    assert len(layout.train) == 6 and not layout.train.bad
    assert any(p.endswith(os.path.join("cat", "extra", "more.png"))
               for p in layout.train.paths)


# ---------------------------------------------------- pipes and odd names ----

def test_a_named_pipe_is_a_bad_file_and_never_opened(tmp_path):
    classes(tmp_path / "train", per_class=4)
    classes(tmp_path / "val", per_class=1)
    with watched_fifo(tmp_path / "train" / "cat" / "pipe.png") as opened:
        # augment imagenet with cache auto also reads headers with Pillow first.
        c = config(tmp_path, augment="imagenet", image_size=8)
        datasets = data.load(c, data.describe(c), batch_size=4)
        assert not opened, "the pipe was opened for reading"
        assert datasets.spec.num_train == 8
        assert datasets.info["skipped_files"] == 1
        assert datasets.info["skipped_examples"] == [os.path.join("train", "cat",
                                                                  "pipe.png")]
        strict = config(tmp_path, bad_files="error")
        with pytest.raises(DataError, match=r"data.bad_files: cannot read .*pipe\.png \(not "
                                            r"a regular file but a named pipe \(FIFO\)\)"):
            data.load(strict, data.describe(strict), batch_size=4)
        assert not opened


def test_a_file_name_that_is_not_utf8_is_a_bad_file(tmp_path):
    classes(tmp_path / "train", per_class=4)
    classes(tmp_path / "val", per_class=1)
    with open(os.fsencode(tmp_path / "train" / "cat") + b"/\xff.png", "wb") as f:
        f.write((tmp_path / "train" / "cat" / "0.png").read_bytes())
    c = config(tmp_path)
    datasets = data.load(c, data.describe(c), batch_size=4)
    assert datasets.spec.num_train == 8
    assert datasets.info["skipped_examples"] == [os.path.join("train", "cat", "\\xff.png")]
    strict = config(tmp_path, bad_files="error")
    with pytest.raises(DataError, match=r"cannot read .*cat/\\xff\.png \(its name is not "
                                        r"UTF-8\)"):
        data.load(strict, data.describe(strict), batch_size=4)


def test_a_class_folder_name_that_is_not_utf8_is_refused_by_name(tmp_path):
    classes(tmp_path, per_class=2)
    os.makedirs(os.fsencode(tmp_path) + b"/b\xe9te")
    with open(os.fsencode(tmp_path) + b"/b\xe9te/0.png", "wb") as f:
        f.write((tmp_path / "cat" / "0.png").read_bytes())
    with pytest.raises(DataError, match=r"class folder names must be UTF-8 .*received "
                                        r"\['.*b\\\\xe9te'\]"):
        data.describe(config(tmp_path))


# ------------------------------------------------------------ pixel limit ----

@pytest.mark.parametrize("augment, side", [("none", 23000), ("imagenet", 30000)])
def test_an_image_above_max_pixels_is_a_bad_file_refused_before_decoding(
        tmp_path, augment, side):
    # 30000x30000 is past Pillow's own limit, which ended the imagenet run with a
    # DecompressionBombError traceback while estimating the cache's size.
    classes(tmp_path / "train", per_class=4)
    classes(tmp_path / "val", per_class=1)
    (tmp_path / "train" / "cat" / "bomb.png").write_bytes(png_declaring(side, side))
    c = config(tmp_path, augment=augment)
    start = time.perf_counter()
    datasets = data.load(c, data.describe(c), batch_size=4)
    assert time.perf_counter() - start < 30
    assert datasets.spec.num_train == 8
    assert datasets.info["skipped_examples"] == [os.path.join("train", "cat", "bomb.png")]
    strict = config(tmp_path, augment=augment, bad_files="error")
    with pytest.raises(DataError, match=rf"cannot decode .*bomb\.png \(its header declares "
                                        rf"{side:,}x{side:,} = {side * side:,} pixels, above "
                                        r"the limit of 64,000,000 \(data.max_pixels\)\)"):
        data.load(strict, data.describe(strict), batch_size=4)


def test_max_pixels_applies_to_ordinary_images_too(tmp_path):
    classes(tmp_path / "train", per_class=2)
    classes(tmp_path / "val", per_class=1)
    write_png(tmp_path / "train" / "cat" / "big.png", size=(20, 10))  # 200 pixels
    c = config(tmp_path, max_pixels=150, cache="none")  # 12x10 = 120 passes
    datasets = data.load(c, data.describe(c), batch_size=2)
    assert datasets.info["skipped_examples"] == [os.path.join("train", "cat", "big.png")]
    assert sum(len(y) for _, y in datasets.train_for(0)) == 4
