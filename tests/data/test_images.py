"""Tests of kgreedy.data.images: file names and TF-only decoding of every file kind.

Each file is written by PIL (a second, independent codec) with known pixels;
lossless formats must decode exactly, JPEGs within a few levels.
"""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kgreedy.data.images import IMAGE_EXTENSIONS, decode_image, is_image_name

H, W = 7, 13  # odd sizes, not square, so a transposed or flipped decode shows
_RNG = np.random.default_rng(7)
RGB = _RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
GREY = _RNG.integers(0, 256, (H, W), dtype=np.uint8)
ALPHA = _RNG.integers(0, 256, (H, W), dtype=np.uint8)
PALETTE = np.array([[200, 50, 10], [0, 0, 0], [255, 255, 255], [12, 140, 250],
                    [90, 200, 30]], dtype=np.uint8)
INDICES = _RNG.integers(0, len(PALETTE), (H, W), dtype=np.uint8)
# Smooth enough that JPEG keeps it close; JPEG tests use this.
_Y, _X = np.mgrid[0:H, 0:W]
SMOOTH = np.stack([40 + 10 * _X, 60 + 15 * _Y, 200 - 5 * _X - 5 * _Y], -1).astype(np.uint8)


def _palette_image(indices=INDICES, palette=PALETTE):
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.ravel().tolist())
    return image


def _write(tmp_path, image, name, **options):
    path = tmp_path / name
    image.save(path, **options)
    return path


def _decode(path, channels):
    image = decode_image(tf.io.read_file(str(path)), channels)
    assert image.dtype == tf.uint8 and image.shape == (H, W, channels)
    return image.numpy().astype(int)


def _luminance(rgb):
    return np.asarray(rgb, float) @ [0.2989, 0.5870, 0.1140]


def _check_lossless(path, rgb):
    """Exact colours for channels=3, the rounded luminance for channels=1."""
    np.testing.assert_array_equal(_decode(path, 3), rgb)
    assert np.abs(_decode(path, 1)[..., 0] - _luminance(rgb)).max() <= 0.5 + 1e-3


def _check_grey(path, grey):
    np.testing.assert_array_equal(_decode(path, 1)[..., 0], grey)
    np.testing.assert_array_equal(_decode(path, 3), np.repeat(np.asarray(grey)[..., None], 3, -1))


@pytest.mark.parametrize("name, expected", [
    ("cat.jpg", True), ("cat.JPG", True), ("cat.Jpeg", True), ("a/b/cat.png", True),
    ("cat.bmp", True), ("cat.GIF", True), ("my.cat.png", True),
    ("._cat.jpg", False), (".DS_Store", False), (".hidden.png", False),
    ("a/._cat.jpg", False), ("cat.tiff", False), ("cat.txt", False), ("jpg", False),
    ("cat.jpg.txt", False), ("Thumbs.db", False),
])
def test_is_image_name(name, expected):
    assert is_image_name(name) is expected


def test_extensions_are_lower_case():
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".bmp", ".gif"}


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "P+tRNS"])
def test_png_colour(tmp_path, mode):
    if mode == "RGB":
        path = _write(tmp_path, Image.fromarray(RGB), "a.png")
        expected = RGB
    elif mode == "RGBA":  # alpha is dropped, not composited
        path = _write(tmp_path, Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA"), "a.png")
        expected = RGB
    else:
        options = {"transparency": 1} if mode == "P+tRNS" else {}
        path = _write(tmp_path, _palette_image(), "a.png", **options)
        expected = PALETTE[INDICES]
    _check_lossless(path, expected)


@pytest.mark.parametrize("mode", ["L", "LA", "1"])
def test_png_grey(tmp_path, mode):
    if mode == "L":
        path, grey = _write(tmp_path, Image.fromarray(GREY, "L"), "a.png"), GREY
    elif mode == "LA":
        image = Image.fromarray(np.dstack([GREY, ALPHA]), "LA")
        path, grey = _write(tmp_path, image, "a.png"), GREY
    else:
        grey = np.where(GREY > 127, 255, 0)
        path = _write(tmp_path, Image.fromarray(GREY > 127), "a.png")
    _check_grey(path, grey)


def test_png_16_bit_grey(tmp_path):
    values = _RNG.integers(0, 65536, (H, W)).astype(np.uint16)
    values[0, :4] = [0, 65535, 257 * 9, 32768]
    path = _write(tmp_path, Image.fromarray(values), "a.png")
    assert Image.open(path).mode == "I;16"
    grey = values >> 8
    assert list(grey[0, :4]) == [0, 255, 9, 128]
    _check_grey(path, grey)


def test_png_16_bit_rgb(tmp_path):
    # PIL cannot write 16-bit RGB; TF's encoder can, and `_check_lossless`
    # decodes it back with our code, so this does check the scaling.
    values = _RNG.integers(0, 65536, (H, W, 3)).astype(np.uint16)
    values[0, 0] = [65535, 0, 257 * 200]
    data = tf.io.encode_png(values).numpy()
    assert data[24] == 16  # IHDR bit depth
    path = tmp_path / "a.png"
    path.write_bytes(data)
    _check_lossless(path, values >> 8)
    assert list(_decode(path, 3)[0, 0]) == [255, 0, 200]


def test_jpeg_rgb(tmp_path):
    path = _write(tmp_path, Image.fromarray(SMOOTH), "a.jpg", quality=95)
    pil = np.asarray(Image.open(path).convert("RGB")).astype(int)
    got = _decode(path, 3)
    assert np.abs(got - pil).max() <= 2  # the same (accurate) DCT as PIL's
    assert np.abs(got - SMOOTH).max() <= 12
    assert np.abs(_decode(path, 1)[..., 0] - _luminance(got)).max() <= 1


def test_jpeg_grey(tmp_path):
    grey = (50 + 10 * _X + 5 * _Y).astype(np.uint8)
    path = _write(tmp_path, Image.fromarray(grey, "L"), "a.jpeg", quality=95)
    got = _decode(path, 1)[..., 0]
    assert np.abs(got - grey).max() <= 4
    np.testing.assert_array_equal(_decode(path, 3), np.repeat(got[..., None], 3, -1))


@pytest.mark.parametrize("cmyk, rgb", [
    ((0, 255, 255, 0), (255, 0, 0)),
    ((0, 0, 0, 128), (127, 127, 127)),
    ((50, 100, 150, 30), None),  # PIL's decode is the reference
])
def test_jpeg_cmyk(tmp_path, cmyk, rgb):
    path = _write(tmp_path, Image.new("CMYK", (W, H), cmyk), "a.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    pil = np.asarray(Image.open(path).convert("RGB")).astype(int)
    got = _decode(path, 3)
    assert np.abs(got - pil).max() <= 3
    if rgb is not None:
        assert np.abs(got - np.array(rgb)).max() <= 3
    assert np.abs(_decode(path, 1)[..., 0] - _luminance(got)).max() <= 1


def test_bmp_24_and_32_bit(tmp_path):
    _check_lossless(_write(tmp_path, Image.fromarray(RGB), "a.bmp"), RGB)
    rgba = Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA")
    _check_lossless(_write(tmp_path, rgba, "b.bmp"), RGB)


def test_bmp_8_bit_palette(tmp_path):
    # TF alone returns the palette indices of this one as grey.
    _check_lossless(_write(tmp_path, _palette_image(), "a.bmp"), PALETTE[INDICES])


def test_bmp_8_bit_grey(tmp_path):
    _check_grey(_write(tmp_path, Image.fromarray(GREY, "L"), "a.bmp"), GREY)


def test_bmp_1_bit_is_not_supported(tmp_path):
    path = _write(tmp_path, Image.fromarray(GREY > 127), "a.bmp")
    with pytest.raises(tf.errors.InvalidArgumentError):
        decode_image(tf.io.read_file(str(path)), 3)


def test_gif(tmp_path):
    _check_lossless(_write(tmp_path, _palette_image(), "a.gif"), PALETTE[INDICES])
    _check_grey(_write(tmp_path, Image.fromarray(GREY, "L"), "b.gif"), GREY)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [_palette_image(INDICES), _palette_image(INDICES[::-1]),
              _palette_image(INDICES[:, ::-1])]
    path = _write(tmp_path, frames[0], "a.gif", save_all=True, append_images=frames[1:],
                  duration=100, loop=0)
    assert Image.open(path).n_frames == 3
    _check_lossless(path, PALETTE[INDICES])


def _truncated(data):
    return data[:len(data) // 2]


@pytest.mark.parametrize("kind", [
    "empty", "text", "jpeg_half", "jpeg_without_eoi", "png_half", "gif_half", "bmp_half"])
def test_bad_files_raise(tmp_path, kind):
    def encoded(fmt, image=Image.fromarray(SMOOTH)):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        return buffer.getvalue()
    data = {
        "empty": b"",
        "text": b"name,label\ncat,1\n",  # e.g. a CSV renamed .jpg
        "jpeg_half": _truncated(encoded("JPEG")),
        "jpeg_without_eoi": encoded("JPEG")[:-2],
        "png_half": _truncated(encoded("PNG")),
        "gif_half": _truncated(encoded("GIF", _palette_image())),
        "bmp_half": _truncated(encoded("BMP")),
    }[kind]
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    for channels in (1, 3):
        with pytest.raises(tf.errors.InvalidArgumentError):
            decode_image(tf.io.read_file(str(path)), channels)


def test_channels_must_be_1_or_3():
    with pytest.raises(ValueError):
        decode_image(tf.constant(b""), 4)


def _mixed_files(tmp_path):
    return [_write(tmp_path, Image.fromarray(SMOOTH), "a.jpg", quality=95),
            _write(tmp_path, Image.fromarray(GREY, "L"), "b.png"),
            _write(tmp_path, _palette_image(), "c.bmp"),
            _write(tmp_path, _palette_image(), "d.gif"),
            _write(tmp_path, Image.new("CMYK", (W, H), (0, 255, 255, 0)), "e.jpg")]


@pytest.mark.parametrize("channels", [1, 3])
def test_in_dataset_map(tmp_path, channels):
    paths = _mixed_files(tmp_path)
    ds = tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
    ds = ds.map(lambda p: decode_image(tf.io.read_file(p), channels))
    assert ds.element_spec.shape.as_list() == [None, None, channels]
    for path, image in zip(paths, ds):
        np.testing.assert_array_equal(image.numpy(), _decode(path, channels))


def test_in_graph_function(tmp_path):
    decode = tf.function(lambda data: decode_image(data, 3),
                         input_signature=[tf.TensorSpec([], tf.string)])
    concrete = decode.get_concrete_function()
    assert concrete.structured_outputs.shape.as_list() == [None, None, 3]
    for path in _mixed_files(tmp_path):
        np.testing.assert_array_equal(decode(path.read_bytes()).numpy(), _decode(path, 3))
    with pytest.raises(tf.errors.InvalidArgumentError):
        decode(b"not an image")
