"""Decoding of image files as users have them, in TensorFlow ops only.

`decode_image` runs inside tf.data pipelines and inside exported SavedModel
serving signatures, so it may use no Python image library (PIL, py_function).
It wraps `tf.io.decode_image`, which is right for most files but not all; what
TF 2.21 does by itself, and what this module changes, is:

* JPEG: RGB, greyscale and CMYK decode (TF converts CMYK to RGB itself,
  assuming the inverted Adobe CMYK that Photoshop and PIL write; YCCK goes
  the same way through libjpeg, untested for want of a writer). Only
  `channels=0` works for every colour space: TF cannot give 1 channel from a
  CMYK JPEG ("Unsupported color conversion request"). `tf.io.decode_image`
  uses the fast integer DCT, off PIL by up to 5 levels; we use the accurate
  one, which matches PIL (libjpeg-turbo) exactly. A truncated JPEG, even one
  missing only its final EOI marker, raises. EXIF orientation is not applied.
* PNG: every colour type and bit depth decodes; 16-bit samples become 8-bit
  by libpng's `x >> 8` (65535 -> 255, 257 * v -> v).
* GIF: the first frame, always RGB; transparent pixels come out black.
* BMP: 24- and 32-bit decode; an 8-bit BMP is decoded by TF as its palette
  indices, so we look the colours up in the palette. TF raises for 1-, 4- and
  16-bit BMPs, for RLE-compressed ones (their size does not match the
  uncompressed size TF checks for) and for any BMP with bytes after the
  pixel rows.

Alpha is dropped, not composited: a pixel keeps the colour it stores.

With `max_pixels`, the size the header declares is read before anything is
decoded (`declared_size`: JPEG by `tf.io.extract_jpeg_shape`, PNG's IHDR, GIF's
logical screen, BMP's info header as TF's decoder reads it, WebP's VP8/VP8L/VP8X
header), and an image above the limit is refused with an InvalidArgumentError that
names its size and the limit, so a small file that declares billions of pixels
never reaches the decoder. JPEG XL, which TF also decodes, is refused then: its
size cannot be read this cheaply. Other bytes go on to the decoder, which refuses
them as before. Not limited: the number of frames of an animated GIF or WebP (each
frame is within the limit).
"""

import os

import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_BMP_HEAD = 54  # file header (14 bytes) + BITMAPINFOHEADER (40 bytes)
_JPEG_XL_MAGICS = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \x0d\x0a\x87\x0a")
FORMATS = "JPEG, PNG, GIF, BMP or WebP"  # whose size `declared_size` reads


def is_image_name(name):
    """Whether a file name is one of the images that kgreedy reads.

    Hidden files are not: macOS leaves `._photo.jpg` AppleDouble files (which
    hold metadata, not an image) next to the real ones on foreign disks.

    Args:
        name: a file name or path.

    Returns:
        True for a name that is not hidden and ends in one of
        `IMAGE_EXTENSIONS`, in any case.
    """
    name = os.path.basename(name)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def decode_image(data, channels, max_pixels=None):
    """Decodes a JPEG, PNG, GIF or BMP file into 8-bit pixels.

    Args:
        data: scalar tf.string, the bytes of the file.
        channels: 1 (grey) or 3 (RGB). Colour becomes grey by the luminance
            formula of `tf.image.rgb_to_grayscale`; grey is repeated to RGB.
        max_pixels: refuse, before decoding, an image whose header declares more
            pixels (width x height) than this, and JPEG XL; None decodes
            whatever TF decodes.

    Returns:
        uint8 tensor [height, width, channels], with that static shape.

    Raises:
        ValueError: if channels is not 1 or 3.
        tf.errors.InvalidArgumentError: when run, for bytes that are not a
            whole image of a supported kind (see the module docstring), or an
            image above `max_pixels`.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels!r}")
    data = tf.convert_to_tensor(data, tf.string)
    if max_pixels is None:
        return _decode(data, channels)
    width, height = declared_size(data)
    pixels = width * height
    known = tf.logical_not(_is_jpeg_xl(data))
    ok = tf.logical_and(known, pixels <= max_pixels)

    def refuse():
        # The Asserts sit in the branch that replaces decoding, so a refused image
        # is never decoded, and the error says why in the client's terms.
        checks = [tf.debugging.Assert(known, [_JPEG_XL_REFUSED]),
                  tf.debugging.Assert(pixels <= max_pixels, [
                      "the image's header declares", width, "x", height, "=", pixels,
                      f"pixels, above the limit of {max_pixels} (data.max_pixels)"])]
        with tf.control_dependencies(checks):
            return tf.zeros([0, 0, channels], tf.uint8)

    image = tf.cond(ok, lambda: _decode(data, channels), refuse)
    image.set_shape([None, None, channels])
    return image


def _decode(data, channels):
    """`decode_image` without a size check."""
    # Native channels (0) for every format: TF refuses other counts for some
    # (GIF: only 3; BMP: not 1; CMYK JPEG: not 1), so we convert ourselves.
    image = tf.cond(
        tf.equal(tf.strings.substr(data, 0, len(_JPEG_MAGIC)), _JPEG_MAGIC),
        lambda: tf.io.decode_jpeg(data, channels=0, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=0, expand_animations=False))
    head = _header_bytes(data)
    image = tf.cond(_is_palette_bmp(head),
                    lambda: _bmp_palette_lookup(data, head, image),
                    lambda: image)
    image = _to_channels(image, channels)
    image.set_shape([None, None, channels])
    return image


def _header_text(data):
    """The first `_BMP_HEAD` bytes of a file, zero-padded if shorter (scalar string)."""
    padded = tf.strings.join([tf.strings.substr(data, 0, _BMP_HEAD), b"\0" * _BMP_HEAD])
    return tf.strings.substr(padded, 0, _BMP_HEAD)


def _header_bytes(data):
    """The first `_BMP_HEAD` bytes of a file as uint8, zero-padded if shorter."""
    return tf.io.decode_raw(_header_text(data), tf.uint8)


_JPEG_XL_REFUSED = f"JPEG XL is not accepted (its size cannot be checked); send {FORMATS}"


def _is_jpeg_xl(data):
    text = _header_text(data)
    return tf.reduce_any([tf.equal(tf.strings.substr(text, 0, len(m)), m)
                          for m in _JPEG_XL_MAGICS])


def _uint(head, offset, size, big_endian=False):
    """The unsigned integer of `size` bytes at `offset` of an int64 header."""
    weights = [256 ** i for i in range(size)]
    return tf.reduce_sum(head[offset:offset + size]
                         * (weights[::-1] if big_endian else weights))


def declared_size(data):
    """The image size that a file's header declares, read without decoding.

    Args:
        data: scalar tf.string, the bytes of the file (only its header is read).

    Returns:
        (width, height): int64 scalars; 0 x 0 for bytes that are not a `FORMATS`
        file, and for a header too short to hold the size (the decoder refuses
        both).

    Raises:
        tf.errors.InvalidArgumentError: when run, for a JPEG whose header is
            damaged or cut short.
    """
    data = tf.convert_to_tensor(data, tf.string)
    text = _header_text(data)
    head = tf.cast(tf.io.decode_raw(text, tf.uint8), tf.int64)

    def starts(magic, at=0):
        return tf.equal(tf.strings.substr(text, at, len(magic)), magic)

    def signed32(value):  # BMP: TF reads int32, and a negative height is top-down
        return tf.abs(tf.where(value >= 2 ** 31, value - 2 ** 32, value))

    webp = tf.logical_and(starts(b"RIFF"), starts(b"WEBP", 8))
    vp8l = _uint(head, 21, 4)
    # (format, width, height), the same magic bytes as tf.io.decode_image's.
    kinds = [
        (starts(_PNG_MAGIC), _uint(head, 16, 4, True) * tf.cast(starts(b"IHDR", 12), tf.int64),
         _uint(head, 20, 4, True)),
        (starts(b"GIF8"), _uint(head, 6, 2), _uint(head, 8, 2)),  # the logical screen
        (starts(b"BM"), signed32(_uint(head, 18, 4)), signed32(_uint(head, 22, 4))),
        (tf.logical_and(webp, starts(b"VP8 ", 12)), _uint(head, 26, 2) % 2 ** 14,
         _uint(head, 28, 2) % 2 ** 14),
        (tf.logical_and(webp, starts(b"VP8L", 12)), vp8l % 2 ** 14 + 1,
         vp8l // 2 ** 14 % 2 ** 14 + 1),
        (tf.logical_and(webp, starts(b"VP8X", 12)), _uint(head, 24, 3) + 1,
         _uint(head, 27, 3) + 1),
    ]
    width = height = tf.constant(0, tf.int64)
    for is_kind, w, h in kinds:
        width, height = tf.where(is_kind, w, width), tf.where(is_kind, h, height)
    shape = tf.cond(starts(_JPEG_MAGIC), lambda: _jpeg_size(data),
                    lambda: tf.stack([height, width]))
    return shape[1], shape[0]


_SOF_MARKERS = [m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)]
_JPEG_SEGMENTS = 256  # scanned for the frame header before libjpeg is asked instead


def _jpeg_size(data):
    """(height, width) int64 of a JPEG's frame header (SOF), found by walking its
    segments. A file cut short before the SOF gives 0 x 0 (the decoder then says what
    is wrong, as it did before the limit); segments that are not where they should
    be, or too many of them, leave it to `tf.io.extract_jpeg_shape` (libjpeg's own
    header reading, which skips what libjpeg skips and raises for a damaged header)."""
    length = tf.cast(tf.strings.length(data), tf.int64)

    def at(pos, size):  # big-endian, 0 past the end
        pos = tf.minimum(pos, length)
        chunk = tf.strings.substr(tf.strings.join([tf.strings.substr(data, pos, size),
                                                   b"\0" * size]), 0, size)
        return _uint(tf.cast(tf.io.decode_raw(chunk, tf.uint8), tf.int64), 0, size, True)

    def body(pos, height, width, state, count):
        marker, size = at(pos + 1, 1), at(pos + 2, 2)
        sof = tf.reduce_any(tf.equal(marker, _SOF_MARKERS))
        fill = tf.equal(marker, 0xFF)
        alone = tf.logical_or(tf.logical_and(marker >= 0xD0, marker <= 0xD7),
                              tf.equal(marker, 0x01))
        lost = tf.reduce_any([tf.not_equal(at(pos, 1), 0xFF), count >= _JPEG_SEGMENTS,
                              tf.equal(marker, 0xD9), tf.equal(marker, 0xDA),
                              tf.logical_and(~(fill | alone), size < 2)])
        state = tf.where(pos + 9 > length, 2, tf.where(lost, 3, tf.where(sof, 1, 0)))
        one = tf.constant(1, tf.int64)
        step = tf.where(fill, one, tf.where(alone, 2 * one, 2 + size))
        return (pos + step, tf.where(sof, at(pos + 5, 2), height),
                tf.where(sof, at(pos + 7, 2), width), state, count + 1)

    zero = tf.constant(0, tf.int64)
    _, height, width, state, _ = tf.while_loop(
        lambda pos, height, width, state, count: tf.equal(state, 0), body,
        (tf.constant(2, tf.int64), zero, zero, tf.constant(0), tf.constant(0)))
    return tf.case([(tf.equal(state, 1), lambda: tf.stack([height, width])),
                    (tf.equal(state, 2), lambda: tf.stack([zero, zero]))],
                   default=lambda: tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64))


def size_problem(data, max_pixels):
    """Why `decode_image(data, ..., max_pixels)` refuses a file before decoding it.

    Eager; for messages that name the file (training's bad files,
    `kgreedy.predict`).

    Args:
        data: the bytes of the file.
        max_pixels: the limit.

    Returns:
        A one-line reason, or None when the header is within the limit (or a
        JPEG header is damaged: the decoder's own error then says how).
    """
    data = tf.convert_to_tensor(data, tf.string)
    try:
        width, height = (int(t) for t in declared_size(data))
    except tf.errors.InvalidArgumentError:
        return None
    if bool(_is_jpeg_xl(data)):
        return _JPEG_XL_REFUSED
    if width * height > max_pixels:
        return (f"its header declares {width:,}x{height:,} = {width * height:,} pixels, "
                f"above the limit of {max_pixels:,} (data.max_pixels)")
    return None


def _le32(head, offset):
    """The little-endian 32-bit integer at `offset` of the header, as int32."""
    b = tf.cast(head[offset:offset + 4], tf.int32)
    return b[0] + b[1] * 2**8 + b[2] * 2**16 + b[3] * 2**24


def _is_palette_bmp(head):
    """Whether the header is that of an 8-bit (so palette) BMP."""
    is_bmp = tf.logical_and(tf.equal(head[0], ord("B")), tf.equal(head[1], ord("M")))
    bits = tf.cast(head[28], tf.int32) + tf.cast(head[29], tf.int32) * 2**8
    return tf.logical_and(is_bmp, tf.equal(bits, 8))


def _bmp_palette_lookup(data, head, indices):
    """Colours of an 8-bit BMP that TF decoded as palette indices [H, W, 1].

    Even a grey BMP (PIL's mode L) has a palette, so this is right for it too.
    The palette lies between the info header and the pixels; it holds
    `biClrUsed` BGRX entries, or 256 if that is 0.
    """
    start = 14 + _le32(head, 14)
    used = _le32(head, 46)
    count = tf.minimum((_le32(head, 10) - start) // 4,
                       tf.where(tf.logical_and(used > 0, used <= 256), used, 256))
    count = tf.maximum(count, 0)
    bgrx = tf.reshape(tf.io.decode_raw(tf.strings.substr(data, start, 4 * count), tf.uint8),
                      [-1, 4])
    # An index past a short palette is black, not an out-of-range error.
    palette = tf.pad(tf.reverse(bgrx[:, :3], axis=[1]), [[0, 256 - count], [0, 0]])
    return tf.gather(palette, tf.cast(indices[..., 0], tf.int32))


def _to_channels(image, channels):
    """Converts a decoded image of 1 to 4 channels to `channels` (1 or 3)."""
    has_colour = tf.shape(image)[-1] >= 3  # 2 is grey + alpha, 4 is RGB + alpha
    if channels == 1:
        return tf.cond(has_colour, lambda: _luminance(image[..., :3]),
                       lambda: image[..., :1])
    return tf.cond(has_colour, lambda: image[..., :3],
                   lambda: tf.tile(image[..., :1], [1, 1, 3]))


def _luminance(rgb):
    """Grey uint8 [H, W, 1] of uint8 RGB, rounded to the nearest level.

    On uint8 input `tf.image.rgb_to_grayscale` scales by 255.5 and truncates,
    which leaves about one colour in four a level below the nearest one.
    """
    grey = tf.image.rgb_to_grayscale(tf.cast(rgb, tf.float32))
    return tf.cast(tf.clip_by_value(tf.round(grey), 0.0, 255.0), tf.uint8)
