"""Preparing a TFDS dataset that is not there yet, failing in seconds when it can't be.

TFDS left alone retries downloads for minutes without a network, and a dataset with
a manual download (ImageNet) fails with a long traceback. Both are turned into one
line that says what to do: which directory, which files.
"""

import os
import socket
import urllib.parse

from kgreedy.base.errors import DataError

# Archives a manual-download dataset needs, as its TFDS instructions name them.
MANUAL_FILES = {
    "imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
    "imagenet2012_subset": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
}


def manual_dir(builder, config):
    """Where TFDS looks for manually downloaded archives: DATA_DIR/downloads/manual."""
    root = os.path.expanduser(config.data_dir) if config.data_dir else builder._data_dir_root
    return os.path.join(root, "downloads", "manual")


def prepare(builder, config):
    """Prepares `builder` when possible; else raises `DataError` in seconds.

    A manual-download dataset is prepared from its archives in `manual_dir` (no
    network needed; hours for ImageNet). Any other dataset is downloaded only when
    `data.download` is true and the network answers.

    Raises:
        DataError: the archives are missing, or download is off or impossible.
    """
    import tensorflow_datasets as tfds

    instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if instructions:
        folder = manual_dir(builder, config)
        needed = MANUAL_FILES.get(config.name)
        if needed is None:
            present = os.path.isdir(folder) and os.listdir(folder)
            if not present:
                first = " ".join(instructions.split())[:300]
                raise DataError("data.data_dir", f"TFDS dataset {config.name} needs a manual "
                                f"download into {folder} (TFDS says: {first})",
                                config.data_dir)
        else:
            missing = [f for f in needed if not os.path.isfile(os.path.join(folder, f))]
            if missing:
                raise DataError(
                    "data.data_dir", f"TFDS dataset {config.name} needs a manual download: "
                    f"put {' and '.join(needed)} into {folder} (missing: "
                    f"{', '.join(missing)}); register at https://image-net.org to get "
                    "them. kgreedy then prepares it once from there (hours); pass "
                    "--set data.data_dir=DIR to use DIR/downloads/manual instead",
                    config.data_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=folder))
        return
    if not config.download:
        raise DataError(
            "data.data_dir", f"TFDS dataset {config.name} is not prepared in "
            f"{builder.data_dir}; prepare it once with `python -c \"import "
            "tensorflow_datasets as tfds; "
            f"tfds.builder('{config.name}', data_dir=DIR).download_and_prepare()\"` "
            "and pass --set data.data_dir=DIR, or set data.download true when online",
            config.data_dir)
    check_online(config.name, builder.info.homepage)
    builder.download_and_prepare()


def check_online(name, homepage, timeout=5.0):
    """Fails in seconds instead of letting TFDS retry downloads for minutes."""
    host = urllib.parse.urlparse(homepage or "").hostname
    if not host:
        return  # nothing to probe: let TFDS try
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        raise DataError("data.download", f"cannot download {name}: no network "
                        "connection; prepare the dataset elsewhere and pass "
                        "--set data.data_dir=DIR", True) from None
