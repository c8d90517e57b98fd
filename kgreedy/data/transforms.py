"""Pixel transforms: the eval-time resize/crop (shared with the export), the
training augmentations, and what an image file's pixels become before a run keeps
them (`prepare_function`).

Stateless ops only in the random transforms, so a draw depends on its seed alone.
"""

import tensorflow as tf

from kgreedy.data.images import decode_image as _decode_uint8

# augment imagenet: training images are kept (and cropped from) with their shorter
# side at most this many times the model's input side. Random crops then come from
# enough pixels, and a folder of large photos is decoded and shrunk only once.
TRAIN_SIDE_FACTOR = 2


def _resize_shorter(images, side):
    """Resizes images ([H,W,C] or [N,H,W,C]) so that the shorter side is `side`
    (rounded), keeping the aspect ratio."""
    shape = tf.shape(images)
    h, w = tf.cast(shape[-3], tf.float32), tf.cast(shape[-2], tf.float32)
    scale = side / tf.minimum(h, w)
    new_h = tf.cast(tf.round(h * scale), tf.int32)
    new_w = tf.cast(tf.round(w * scale), tf.int32)
    return tf.image.resize(images, tf.stack([new_h, new_w]))


def eval_transform(images, spec):
    """Eval-time resize/crop of raw images ([H,W,C] or [N,H,W,C]) to the model input.

    Used by the eval pipeline and by the exported serving signatures, so both see
    exactly the same pixels. The result has the static shape [..., size, size, C]
    that the heads' pooling and flattening need.
    """
    size = spec.image_shape[0]
    images = tf.cast(images, tf.float32)
    if spec.eval_resize == "none":
        return images
    if spec.eval_resize == "resize":
        if tuple(images.shape[-3:-1]) == (size, size):
            return images  # already the model's size (kept images): resizing is a no-op
        return tf.image.resize(images, (size, size))
    images = _resize_shorter(images, size / spec.crop_fraction)
    shape = tf.shape(images)
    top, left = (shape[-3] - size) // 2, (shape[-2] - size) // 2
    images = images[..., top:top + size, left:left + size, :]
    # The slice bounds are tensors, so the static shape is lost; the shorter side is
    # at least size / crop_fraction >= size, so the crop is always size x size.
    return tf.ensure_shape(images, images.shape[:-3].concatenate(
        [size, size, images.shape[-1]]))


def _to_uint8(images):
    return tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)


def prepare_function(spec, split):
    """`fn(uint8 [H,W,C]) -> uint8`: what an image file's pixels become before they
    are kept for the run (`data.cache`) and transformed per epoch.

    Without `augment: imagenet` that is the eval-time resize to the model's size,
    the same for both splits. With it, eval images are resized as `eval_transform`
    resizes them (the centre crop stays for `eval_transform`), and train images
    keep their aspect ratio and at most `TRAIN_SIDE_FACTOR` times the model's side
    on their shorter side, for the random resized crops. Cached or not, a run sees
    the same pixels.

    Args:
        spec: the `DatasetSpec`.
        split: `train` or `eval`.
    """
    size = spec.image_shape[0]

    def fn(image):
        if spec.eval_resize != "resize_crop":
            same = tf.reduce_all(tf.equal(tf.shape(image)[:2], [size, size]))
            return tf.cond(same, lambda: image, lambda: _to_uint8(
                tf.image.resize(tf.cast(image, tf.float32), (size, size))))
        if split == "eval":
            return _to_uint8(_resize_shorter(tf.cast(image, tf.float32),
                                             size / spec.crop_fraction))
        side = TRAIN_SIDE_FACTOR * size
        shorter = tf.minimum(tf.shape(image)[0], tf.shape(image)[1])
        return tf.cond(shorter <= side, lambda: image, lambda: _to_uint8(
            _resize_shorter(tf.cast(image, tf.float32), side)))

    return fn


def match_channels(image, channels):
    """Converts float images between 1 and 3 channels."""
    have = image.shape[-1]
    if have == channels:
        return image
    if channels == 1:
        return tf.image.rgb_to_grayscale(image)
    return tf.image.grayscale_to_rgb(image)


def decode_image(data, channels, max_pixels=None):
    """Decodes image file bytes (see `kgreedy.data.images`) to float32 [H, W, channels]
    on the 0..255 scale; with `max_pixels`, an image whose header declares more
    pixels is refused before decoding (InvalidArgumentError)."""
    return tf.cast(_decode_uint8(data, channels, max_pixels), tf.float32)


def train_transform(config, spec):
    """`fn(image, seed)`: the training transform; `seed` is an int64 [2] tensor.

    Stateless random ops only, so a draw depends on the seed alone and not on how
    many examples went before (resume, sharding, parallel map order).
    """
    size = spec.image_shape[0]
    if config.augment == "cifar":
        def fn(image, seed):
            crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            image = eval_transform(image, spec)
            image = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
            image = tf.image.stateless_random_crop(image, (size, size, spec.image_shape[2]),
                                                   seed=crop_seed)
            return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    elif config.augment == "imagenet":
        def fn(image, seed):
            box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            begin, box, _ = tf.image.stateless_sample_distorted_bounding_box(
                tf.shape(image), tf.zeros([0, 0, 4]), seed=box_seed, min_object_covered=0.0,
                aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
                max_attempts=10, use_image_if_no_bounding_boxes=True)
            image = tf.slice(image, begin, box)
            image = tf.image.resize(image, (size, size))
            return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    else:
        def fn(image, seed):
            del seed  # no augmentation
            return eval_transform(image, spec)
    return fn
