"""Where examples come from: Fashion-MNIST (embedded default), an ImageNet-style folder, or any TFDS dataset.

A source is this host's shard of one split. Examples are dicts `{"image": encoded bytes (tf.string) or
uint8 [H, W, C], "label": int32}`; decoding happens later, in the augmentation map, once per example.

* Random-access sources (`ArraySource` for Fashion-MNIST, `FolderSource` for folders) give example `i` of
  the shard with `get(i)` as a TF function, so the pipeline can draw a fresh full permutation each epoch
  (`tf.random.experimental.index_shuffle`) and a resumed run can jump straight to any position.
* `TfdsSource` streams the shard's records in a fixed order with `stream()`; the pipeline shuffles them
  with an epoch-seeded buffer (records are already shuffled when TFDS prepares a data set).

Hosts: every host reads a contiguous, near-equal slice (`tfds.even_splits` semantics: the first
`n % process_count` hosts get one example more); `host_counts` holds every host's count so evaluation can
run the same number of batches on all hosts.

Split names may carry an absolute slice, e.g. `"train[:1000]"` or `"validation[100:200]"`.

Folder listings keep regular files only, within the byte budget (`data.max_image_bytes`): a FIFO or device named
`*.JPEG` would block a reader forever. Entries left out are named once in a warning and kept in `left_out`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
from typing import Any

import numpy as np
import tensorflow as tf

from swin_ssl import hosts, storage
from swin_ssl.data import fashion_mnist
from swin_ssl.data.defaults import MAX_IMAGE_BYTES

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif")
_SLICE = re.compile(r"^(?P<name>[^\[\]]+)(\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


def parse_split(split: str) -> tuple[str, slice]:
    """`"train[10:20]"` -> `("train", slice(10, 20))`; only absolute integer slices are understood here."""
    m = _SLICE.match(split.strip())
    if not m:
        raise ValueError(f"cannot parse split {split!r}: use NAME or NAME[start:stop] with integers")
    to_int = lambda s: int(s) if s not in (None, "") else None  # noqa: E731
    return m.group("name"), slice(to_int(m.group("start")), to_int(m.group("stop")))


def host_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Contiguous slice of `n` examples for one host, sizes differing by at most one."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    base, extra = divmod(n, process_count)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (1 if process_index < extra else 0)


@dataclasses.dataclass
class ArraySource:
    """In-memory uint8 images (Fashion-MNIST): random access by index."""
    name: str
    images: np.ndarray  # this host's shard, uint8 [n, H, W] or [n, H, W, C]
    labels: np.ndarray  # int32 [n]
    host_counts: tuple[int, ...]
    offset: int = 0     # global index of the shard's first example
    random_access: bool = True

    def __post_init__(self):
        self._images = tf.constant(self.images)
        self._labels = tf.constant(self.labels.astype(np.int32))

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def get(self, index: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"image": tf.gather(self._images, index), "label": tf.gather(self._labels, index)}

    def describe(self, index: int) -> str:
        return f"{self.name} example {self.offset + index}"


@dataclasses.dataclass
class FolderSource:
    """Image files of one split folder `<root>/<split>/<class>/<file>`: random access by index."""
    name: str
    paths: np.ndarray   # this host's shard, str [n]
    labels: np.ndarray  # int32 [n]
    host_counts: tuple[int, ...]
    class_names: tuple[str, ...]
    left_out: tuple[str, ...] = ()  # entries of the whole split that are not readable image files, with the reason
    random_access: bool = True

    def __post_init__(self):
        self._paths = tf.constant(self.paths.astype(object) if len(self.paths) else np.zeros([0], object),
                                  tf.string)
        self._labels = tf.constant(self.labels.astype(np.int32))

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def get(self, index: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"image": tf.io.read_file(tf.gather(self._paths, index)), "label": tf.gather(self._labels, index)}

    def describe(self, index: int) -> str:
        return str(self.paths[index])


@dataclasses.dataclass
class TfdsSource:
    """A TFDS split's host shard, streamed in a fixed order (images left encoded with SkipDecoding)."""
    name: str
    builder: Any
    host_split: Any
    host_counts: tuple[int, ...]
    process_index: int
    image_key: str = "image"
    label_key: str = "label"
    decoders: Any = None
    random_access: bool = False

    @property
    def num_examples(self) -> int:
        return self.host_counts[self.process_index]

    def stream(self) -> tf.data.Dataset:
        import tensorflow_datasets as tfds
        read_config = tfds.ReadConfig(skip_prefetch=True, try_autocache=False, interleave_cycle_length=16)
        ds = self.builder.as_dataset(split=self.host_split, shuffle_files=False, decoders=self.decoders,
                                     read_config=read_config)
        return ds.map(lambda ex: {"image": ex[self.image_key], "label": tf.cast(ex[self.label_key], tf.int32)})

    def describe(self, index: int) -> str:
        # Records carry no file name once dropped; name the stream position instead.
        return f"tfds {self.name} split {self.host_split}: example at stream position {index}"


# --------------------------------------------------------------------------------------------- builders
def fashion_mnist_source(split: str, data_dir: str | None, process_index: int, process_count: int) -> ArraySource:
    name, sl = parse_split(split)
    images, labels = fashion_mnist.load(name, data_dir)
    indices = np.arange(len(labels))[sl]
    if len(indices) == 0:
        raise ValueError(f"Fashion-MNIST split {split!r} is empty")
    counts = tuple(np.diff(host_range(len(indices), p, process_count))[0] for p in range(process_count))
    start, stop = host_range(len(indices), process_index, process_count)
    mine = indices[start:stop]
    return ArraySource(name=f"fashion_mnist/{split}", images=images[mine], labels=labels[mine],
                       host_counts=tuple(int(c) for c in counts), offset=int(mine[0]) if len(mine) else 0)


def _split_dir(root: str, split: str) -> str:
    aliases = {"validation": ("validation", "val"), "val": ("val", "validation")}
    for candidate in aliases.get(split, (split,)):
        path = os.path.join(root, candidate)
        if tf.io.gfile.isdir(path):
            return path
    return os.path.join(root, split)


def _unusable(entry: os.DirEntry, max_bytes: int) -> str | None:
    """Why a local directory entry cannot be an image file, or None: it must be a regular file (a FIFO or a device
    would block the reader forever) of at most `max_bytes`."""
    try:
        info = entry.stat()  # follows symlinks: a link to a regular file is fine
    except OSError as e:
        return f"cannot stat it ({e.strerror})"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size > max_bytes:
        return f"{info.st_size} bytes, over the byte budget of {max_bytes} (data.max_image_bytes)"
    return None


def _image_files(folder: str, max_bytes: int) -> tuple[list[str], list[str]]:
    """Sorted image file names of one class folder, and the entries left out (with the reason).

    Local folders are checked entry by entry; an object store (a URL) holds regular objects only, whose byte budget
    is checked after the read instead.
    """
    if storage.is_remote(folder):
        return sorted(f for f in tf.io.gfile.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)), []
    keep, left_out = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            why = _unusable(entry, max_bytes)
            if why:
                left_out.append(f"{entry.path}: {why}")
            else:
                keep.append(entry.name)
    return sorted(keep), sorted(left_out)


def list_folder(root: str, split: str, max_bytes: int = MAX_IMAGE_BYTES
                ) -> tuple[list[str], np.ndarray, tuple[str, ...], list[str]]:
    """Lists `<root>/<split>/<class>/*` images; class ids come from the sorted class folders of `train`.

    The ids are taken from `<root>/train` when it exists so that every split uses the same mapping.
    Returns `(paths, labels, classes, left_out)`: `left_out` names the entries with an image extension that are
    not regular files or are over `max_bytes` (they are never opened), each with the reason.
    Raises ValueError naming the path when the folder is missing or holds no images.
    """
    if not root:
        raise ValueError("source 'folder' needs config.data_dir (a folder with <split>/<class>/<image> files)")
    if not tf.io.gfile.isdir(root):
        raise ValueError(f"data directory {root!r} does not exist")
    split_dir = _split_dir(root, split)
    if not tf.io.gfile.isdir(split_dir):
        raise ValueError(f"split folder {split_dir!r} does not exist (expected {root}/{split}/<class>/<image>)")
    class_root = os.path.join(root, "train") if tf.io.gfile.isdir(os.path.join(root, "train")) else split_dir
    classes = tuple(sorted(d.rstrip("/") for d in tf.io.gfile.listdir(class_root)
                           if tf.io.gfile.isdir(os.path.join(class_root, d))))
    if not classes:
        raise ValueError(f"data directory {class_root!r} has no class folders (expected <class>/<image> files)")
    class_id = {c: i for i, c in enumerate(classes)}
    paths, labels, left_out = [], [], []
    for c in sorted(d.rstrip("/") for d in tf.io.gfile.listdir(split_dir)
                    if tf.io.gfile.isdir(os.path.join(split_dir, d))):
        if c not in class_id:
            raise ValueError(f"class folder {os.path.join(split_dir, c)!r} is not among the classes of {class_root!r}")
        files, bad = _image_files(os.path.join(split_dir, c), max_bytes)
        paths += [os.path.join(split_dir, c, f) for f in files]
        labels += [class_id[c]] * len(files)
        left_out += bad
    if not paths:
        raise ValueError(f"data directory {split_dir!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
                         + (f"; left out: {'; '.join(left_out[:5])}" if left_out else ""))
    return paths, np.asarray(labels, np.int32), classes, left_out


def folder_source(root: str, split: str, process_index: int, process_count: int,
                  max_bytes: int = MAX_IMAGE_BYTES) -> FolderSource:
    name, sl = parse_split(split)
    paths, labels, classes, left_out = list_folder(root, name, max_bytes)
    for entry in left_out:
        log.warning("left out of %s/%s: %s", root, split, entry)
    indices = np.arange(len(paths))[sl]
    if len(indices) == 0:
        raise ValueError(f"split {split!r} of {root!r} is empty")
    counts = tuple(int(np.diff(host_range(len(indices), p, process_count))[0]) for p in range(process_count))
    start, stop = host_range(len(indices), process_index, process_count)
    mine = indices[start:stop]
    return FolderSource(name=f"{root}/{split}", paths=np.asarray(paths, dtype=object)[mine], labels=labels[mine],
                        host_counts=counts, class_names=classes, left_out=tuple(left_out))


def _count(builder, split, decoders) -> int:
    try:
        return int(builder.info.splits[split].num_examples)
    except KeyError:
        # No split metadata (under tfds.testing.mock_data, or not prepared): count the records; as_dataset
        # raises AssertionError when the data set was never prepared.
        ds = builder.as_dataset(split=split, decoders=decoders)
        return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


def _prepare(builder, manual_dir: str) -> None:
    """Prepares a TFDS data set from its manual downloads unless it is prepared already."""
    import tensorflow_datasets as tfds
    if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def tfds_source(name: str, split: str, data_dir: str | None, manual_dir: str | None, process_index: int,
                process_count: int, image_key: str = "image", label_key: str = "label") -> TfdsSource:
    import tensorflow_datasets as tfds
    builder = tfds.builder(name, data_dir=data_dir)
    if manual_dir:
        # Hosts share data_dir: process 0 prepares the data set (once), the others wait, then read what it wrote.
        hosts.leader_decides(lambda: _prepare(builder, manual_dir))
        builder = tfds.builder(name, data_dir=data_dir)
    for key in (image_key, label_key):
        if key not in builder.info.features:
            raise ValueError(f"TFDS {name} has no feature {key!r} (features: {list(builder.info.features)})")
    decoders = ({image_key: tfds.decode.SkipDecoding()}
                if isinstance(builder.info.features[image_key], tfds.features.Image) else None)
    host_splits = tfds.even_splits(split, n=process_count)
    try:
        counts = tuple(_count(builder, s, decoders) for s in host_splits)
        builder.as_dataset(split=host_splits[process_index], decoders=decoders)
    except AssertionError as e:  # TFDS asserts when the data set was never prepared
        raise ValueError(f"TFDS data set {name!r} is not prepared in {builder.data_dir!r}: set data_dir to where "
                         f"it was prepared, or manual_dir to the folder with its manual downloads "
                         f"(ImageNet: ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar)") from e
    if counts[process_index] == 0:
        raise ValueError(f"TFDS {name} split {split!r} has no examples for host {process_index}")
    return TfdsSource(name=name, builder=builder, host_split=host_splits[process_index], host_counts=counts,
                      process_index=process_index, image_key=image_key, label_key=label_key, decoders=decoders)


def make_source(config: Any, split: str, process_index: int, process_count: int):
    """Builds the host's source from the data config (`source`, `data_dir`, `manual_dir`, keys)."""
    source = config.get("source") or "fashion_mnist"
    data_dir = config.get("data_dir")
    if source == "fashion_mnist":
        return fashion_mnist_source(split, data_dir, process_index, process_count)
    if source == "folder":
        return folder_source(data_dir, split, process_index, process_count,
                             config.get("max_image_bytes") or MAX_IMAGE_BYTES)
    name = source[len("tfds:"):] if source.startswith("tfds:") else source
    return tfds_source(name, split, data_dir, config.get("manual_dir"), process_index, process_count,
                       config.get("image_key") or "image", config.get("label_key") or "label")
