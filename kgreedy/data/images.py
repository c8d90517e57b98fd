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
"""

import os

import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

_JPEG_MAGIC = b"\xff\xd8\xff"
_BMP_HEAD = 54  # file header (14 bytes) + BITMAPINFOHEADER (40 bytes)


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


def decode_image(data, channels):
    """Decodes a JPEG, PNG, GIF or BMP file into 8-bit pixels.

    Args:
        data: scalar tf.string, the bytes of the file.
        channels: 1 (grey) or 3 (RGB). Colour becomes grey by the luminance
            formula of `tf.image.rgb_to_grayscale`; grey is repeated to RGB.

    Returns:
        uint8 tensor [height, width, channels], with that static shape.

    Raises:
        ValueError: if channels is not 1 or 3.
        tf.errors.InvalidArgumentError: when run, for bytes that are not a
            whole image of a supported kind (see the module docstring).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels!r}")
    data = tf.convert_to_tensor(data, tf.string)
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


def _header_bytes(data):
    """The first `_BMP_HEAD` bytes of a file as uint8, zero-padded if shorter."""
    padded = tf.strings.join([tf.strings.substr(data, 0, _BMP_HEAD), b"\0" * _BMP_HEAD])
    return tf.io.decode_raw(tf.strings.substr(padded, 0, _BMP_HEAD), tf.uint8)


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
