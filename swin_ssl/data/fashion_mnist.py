"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package: the embedded default data set.

Why a Debian package: these machines reach no download host at run time, only package registries, and
Debian ships the full data set (60k train + 10k test, 28x28 grey, 10 classes, MIT) as the original gzipped
IDX files. The files are looked up, in order, in

1. an explicit directory (`config.data.data_dir`); when given it must hold the files: no silent fallback;
2. `/usr/share/datasets/fashion-mnist` (where `apt-get install dataset-fashion-mnist` puts them, root);
3. `~/.cache/swin_ssl/fashion-mnist` (where `--fetch` puts them, no root needed).

Command line::

    python -m swin_ssl.data.fashion_mnist                    # tell where the files are (exit 1 if absent)
    python -m swin_ssl.data.fashion_mnist --fetch --cache DIR  # apt-get download + dpkg-deb -x into DIR

IDX format: the images file has a 16-byte header (magic 2051, count, rows, cols) and then uint8 pixels;
the labels file an 8-byte header (magic 2049, count) and then uint8 labels.
"""
from __future__ import annotations

import argparse
import functools
import glob
import gzip
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

PACKAGE = "dataset-fashion-mnist"
SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
CACHE_DIR = os.path.join("~", ".cache", "swin_ssl", "fashion-mnist")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
# "validation" is accepted so that configs written for ImageNet work unchanged.
SPLIT_ALIASES = {"validation": "test", "val": "test"}


def how_to_install(cache: str = CACHE_DIR) -> str:
    return (f"Install it system-wide with `sudo apt-get install {PACKAGE}` (files land in {SYSTEM_DIR}), "
            f"or without root: `python -m swin_ssl.data.fashion_mnist --fetch --cache {cache}`.")


def _has_files(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, f)) for pair in _FILES.values() for f in pair)


def find_dir(data_dir: str | None = None) -> str:
    """Returns the directory holding the four IDX files; raises ValueError telling what to run if none does."""
    if data_dir:
        path = os.path.expanduser(data_dir)
        if not _has_files(path):
            missing = [f for pair in _FILES.values() for f in pair if not os.path.isfile(os.path.join(path, f))]
            raise ValueError(f"Fashion-MNIST directory {path!r} lacks {missing}. " + how_to_install(path))
        return path
    candidates = [SYSTEM_DIR, os.path.expanduser(CACHE_DIR)]
    for path in candidates:
        if _has_files(path):
            return path
    raise ValueError(f"Fashion-MNIST not found (looked in {candidates}). " + how_to_install())


_MAX_IDX_BYTES = 2**28  # 5x the largest Fashion-MNIST file (60k x 28 x 28): a gzip bomb stops here


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
    """An IDX array; reads only the bytes its header announces (after checking them), never the whole stream."""
    with gzip.open(path, "rb") as f:
        head = f.read(4 * (1 + ndim))
        if len(head) < 4 * (1 + ndim):
            raise ValueError(f"{path}: truncated IDX header ({len(head)} bytes)")
        header = np.frombuffer(head, dtype=">u4")
        if int(header[0]) != magic:
            raise ValueError(f"{path}: not an IDX file with magic {magic} (got {int(header[0])})")
        shape = tuple(int(d) for d in header[1:])
        size = int(np.prod(shape, dtype=np.int64))
        if size > _MAX_IDX_BYTES:
            raise ValueError(f"{path}: header declares shape {shape} ({size} bytes), over {_MAX_IDX_BYTES}")
        body = np.frombuffer(f.read(size), dtype=np.uint8)
        extra = len(f.read(1))
    if body.size != size or extra:
        raise ValueError(f"{path}: expected {size} bytes of data for shape {shape}, got "
                         f"{body.size if not extra else 'more'}")
    return body.reshape(shape)


def canonical_split(split: str) -> str:
    split = SPLIT_ALIASES.get(split, split)
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST has splits {sorted(_FILES)} (and aliases {sorted(SPLIT_ALIASES)}), "
                         f"not {split!r}")
    return split


def load(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns `(images uint8 [N, 28, 28], labels int32 [N])` of `split` ("train" or "test"), read-only."""
    return _load(canonical_split(split), find_dir(data_dir))


@functools.lru_cache(maxsize=4)  # pipelines are built several times per process (train, k-NN bank, eval)
def _load(split: str, directory: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = (os.path.join(directory, f) for f in _FILES[split])
    images = _read_idx(images_file, 2051, 3)
    labels = _read_idx(labels_file, 2049, 1).astype(np.int32)
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} images but {len(labels)} labels in split {split!r}")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def fetch(cache: str) -> str:
    """Obtains the package without root: `apt-get download` + `dpkg-deb -x`, copies the IDX files into `cache`."""
    cache = os.path.expanduser(cache)
    with tempfile.TemporaryDirectory() as tmp:
        for tool in ("apt-get", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"`{tool}` is not available: this fetch needs a Debian/Ubuntu system. "
                                   f"Put the four IDX files of Fashion-MNIST into {cache} by hand instead.")
        proc = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = glob.glob(os.path.join(tmp, f"{PACKAGE}_*.deb"))
        if proc.returncode != 0 or not debs:
            raise RuntimeError(
                f"`apt-get download {PACKAGE}` failed:\n{proc.stderr.strip()}\n"
                f"If the package is unknown, the package lists are missing: run `sudo apt-get update` first "
                f"(or install system-wide with `sudo apt-get install {PACKAGE}`).")
        root = os.path.join(tmp, "root")
        subprocess.run(["dpkg-deb", "-x", debs[0], root], check=True, capture_output=True)
        unpacked = os.path.join(root, SYSTEM_DIR.lstrip("/"))
        if not _has_files(unpacked):
            raise RuntimeError(f"{os.path.basename(debs[0])} does not contain the IDX files under {SYSTEM_DIR}")
        os.makedirs(cache, exist_ok=True)
        for pair in _FILES.values():
            for name in pair:
                shutil.copyfile(os.path.join(unpacked, name), os.path.join(cache, name))
    return cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swin_ssl.data.fashion_mnist", description=__doc__.split("\n")[0])
    parser.add_argument("--fetch", action="store_true", help=f"apt-get download {PACKAGE} and unpack it into --cache")
    parser.add_argument("--cache", default=CACHE_DIR, help="where --fetch puts the files (default: %(default)s)")
    parser.add_argument("--data_dir", default=None, help="check this directory instead of the default lookup")
    args = parser.parse_args(argv)
    try:
        if args.fetch:
            print(f"Fashion-MNIST unpacked into {fetch(args.cache)}")
        directory = find_dir(args.data_dir or (args.cache if args.fetch else None))
        sizes = {s: len(load(s, directory)[1]) for s in _FILES}
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Fashion-MNIST found in {directory}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
