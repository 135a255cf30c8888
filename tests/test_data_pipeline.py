"""tf.data pipelines: sources, sharding, determinism/resume, eval padding, broken files, global arrays."""
import gzip
import io
import json
import logging
import os
import shutil
import stat
import subprocess

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from swin_ssl import data
from swin_ssl.data import augment as aug
from swin_ssl.data import fashion_mnist, pipeline, sources
from tests.xla_env import xla_flags

MEAN, STD = np.asarray(aug.IMAGENET_MEAN), np.asarray(aug.IMAGENET_STD)
LO, HI = (0 - MEAN) / STD, (1 - MEAN) / STD  # per-channel range of a normalised [0, 1] image


def _save(path, image, fmt="JPEG", **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path, fmt, **kw)


def _texture(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, 128 + 90 * np.sin(xx / 5.0 + rng.uniform(0, 6))], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """`train/<class>/*.JPEG`: textured photos of odd sizes, one grey, one tiny."""
    root = str(tmp_path_factory.mktemp("jpegs"))
    rng = np.random.default_rng(0)
    for c, name in enumerate(("n01", "n02")):
        for i in range(6):
            h, w = int(rng.integers(30, 90)), int(rng.integers(30, 90))
            img = _texture(rng, h, w)
            if i == 1:
                img = img[..., 0]  # greyscale JPEG
            if i == 2:
                img = img[:7, :5]  # smaller than every crop
            _save(os.path.join(root, "train", name, f"img{c}_{i}.JPEG"), img, quality=90)
    return root


def _colour(i):
    return np.array([10 + 5 * i, 250 - 3 * i, (7 * i) % 256], np.uint8)


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """37 lossless images, each one flat colour that identifies it, in 3 classes (13 + 12 + 12)."""
    root = str(tmp_path_factory.mktemp("colours"))
    for i in range(37):
        cls = ["a", "b", "c"][i % 3]
        img = np.broadcast_to(_colour(i), (9 + i % 5, 11 + i % 7, 3)).copy()
        _save(os.path.join(root, "train", cls, f"{i:03d}.png"), img, fmt="PNG")
    return root


def _identify(images):
    """Flat-colour eval images -> colour ids."""
    rgb = np.rint((images.reshape(len(images), -1, 3).mean(1) * STD + MEAN) * 255)
    ids = (rgb[:, 0] - 10) / 5
    assert np.allclose(ids, np.round(ids)) and all((_colour(int(i)) == c).all() for i, c in zip(ids, rgb))
    return ids.astype(int).tolist()


def _cfg(recipe, **kw):
    base = dict(image_size=16, local_size=8, num_local_crops=3, blur_sigma=(0.1, 0.5), prefetch=1)
    return data.default_config(recipe, **dict(base, **kw))


# ----------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("recipe,keys", [
    ("moby", {"view1": 16, "view2": 16}),
    ("multicrop", {"global0": 16, "global1": 16, "local0": 8, "local1": 8, "local2": 8}),
    ("linear", {"image": 16, "label": None}),
])
def test_train_batches_have_contract_keys_shapes_and_ranges(jpeg_folder, recipe, keys):
    cfg = _cfg(recipe, source="folder", data_dir=jpeg_folder)
    it = data.make_train_iterator(cfg, batch_size_per_host=5, process_index=0, process_count=1, seed=0)
    for _ in range(3):  # 15 examples > one epoch of 12: crosses the epoch boundary
        batch = next(it)
        assert set(batch) == set(keys)
        for key, size in keys.items():
            x = batch[key]
            if size is None:
                assert x.dtype == np.int32 and x.shape == (5,) and set(x.tolist()) <= {0, 1}
                continue
            assert x.dtype == np.float32 and x.shape == (5, size, size, 3)
            assert np.isfinite(x).all() and x.std() > 0.05
            assert (x >= LO - 1e-5).all() and (x <= HI + 1e-5).all()
    assert it.num_skipped == 0


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.slow
def test_same_seed_same_batches_other_seed_others_and_resume(jpeg_folder):
    cfg = _cfg("multicrop", source="folder", data_dir=jpeg_folder)
    make = lambda **kw: data.make_train_iterator(cfg, batch_size_per_host=4, process_index=0,  # noqa: E731
                                                 process_count=1, **kw)
    first = _take(make(seed=0), 5)  # 20 positions: crosses an epoch of 12
    assert _equal(first, _take(make(seed=0), 5))
    other = _take(make(seed=1), 5)
    assert not any(np.array_equal(a["global0"], b["global0"]) for a, b in zip(first, other))
    # A run resumed at step 3 sees exactly what the uninterrupted run saw from step 3 on.
    assert _equal(first[3:], _take(make(seed=0, start_step=3), 2))


def test_each_host_permutes_its_own_shard_every_epoch():
    n = 23
    images = np.zeros([n, 4, 4], np.uint8)
    shards = []
    for host in range(2):
        start, stop = sources.host_range(n, host, 2)
        src = sources.ArraySource("ids", images[start:stop], np.arange(start, stop, dtype=np.int32),
                                  host_counts=(12, 11))
        m = src.num_examples
        stream = pipeline._train_positions(src, seed=3, process_index=host, start=0, shuffle_buffer=0)
        got = [(int(p), int(ex["label"])) for p, ex in stream.take(3 * m).as_numpy_iterator()]
        assert [p for p, _ in got] == list(range(3 * m))
        epochs = [[label for _, label in got[e * m:(e + 1) * m]] for e in range(3)]
        assert all(sorted(e) == list(range(start, stop)) for e in epochs)  # a permutation each epoch
        assert epochs[0] != epochs[1] != epochs[2]                           # reshuffled each epoch
        resumed = pipeline._train_positions(src, seed=3, process_index=host, start=m + 5, shuffle_buffer=0)
        assert [int(ex["label"]) for _, ex in resumed.take(4).as_numpy_iterator()] == epochs[1][5:9]
        shards.append(set(epochs[0]))
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(n))


# --------------------------------------------------------------------------------------------- eval
def test_eval_covers_every_example_exactly_once_over_two_hosts(colour_folder):
    cfg = _cfg("moby", source="folder", data_dir=colour_folder, eval_split="train")
    seen, lengths = [], []
    for host in range(2):
        ev = data.make_eval_iterator(cfg, batch_size_per_host=8, process_index=host, process_count=2)
        batches = list(ev)
        lengths.append((len(ev), len(batches)))
        for b in batches:
            assert set(b) == {"image", "label", "mask"} and b["image"].shape == (8, 16, 16, 3)
            assert b["label"].dtype == np.int32 and b["mask"].dtype == np.bool_
            assert (b["label"][~b["mask"]] == -1).all() and (b["image"][~b["mask"]] == 0).all()
            ids = _identify(b["image"][b["mask"]])
            assert (b["label"][b["mask"]] == np.array(ids) % 3).all()  # class folder a/b/c = id % 3
            seen += ids
        assert ev.num_examples == 37 and ev.num_skipped == 0
    # 37 over 2 hosts: 19 + 18 -> 3 batches of 8 on both hosts, the last ones padded.
    assert lengths == [(3, 3), (3, 3)]
    assert sorted(seen) == list(range(37))


# ------------------------------------------------------------------------------------- broken files
@pytest.fixture(scope="module")
def broken_folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("broken"))
    d = os.path.join(root, "train", "x")
    red = np.zeros((20, 30, 3), np.uint8)
    red[..., 0] = 200
    _save(os.path.join(d, "a_good.JPEG"), _texture(np.random.default_rng(1), 40, 50))
    _save(os.path.join(d, "b_cmyk.JPEG"), Image.fromarray(red).convert("CMYK"), quality=95)
    _save(os.path.join(d, "c_png_named.JPEG"), red, fmt="PNG")
    _save(os.path.join(d, "d_grey.JPEG"), _texture(np.random.default_rng(2), 30, 30)[..., 1])
    buf = io.BytesIO()
    Image.fromarray(_texture(np.random.default_rng(3), 60, 60)).save(buf, "JPEG")
    with open(os.path.join(d, "e_truncated.JPEG"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    with open(os.path.join(d, "f_garbage.JPEG"), "wb") as f:
        f.write(np.random.default_rng(4).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    return root


@pytest.mark.slow
def test_broken_files_are_skipped_counted_and_named(broken_folder, caplog):
    caplog.set_level(logging.WARNING, logger="swin_ssl.data.pipeline")
    bad = {os.path.join(broken_folder, "train", "x", f) for f in ("e_truncated.JPEG", "f_garbage.JPEG")}
    cfg = _cfg("moby", source="folder", data_dir=broken_folder, eval_split="train", eval_crop_pct=1.0,
               max_skip_fraction=0.5)
    ev = data.make_eval_iterator(cfg, batch_size_per_host=4, process_index=0, process_count=1)
    batches = list(ev)
    images = np.concatenate([b["image"][b["mask"]] for b in batches]) * STD + MEAN
    assert len(images) == 4 and len(batches) == 2  # 6 files, 2 masked out; the padding fills the rest
    assert [b["mask"].tolist() for b in batches] == [[True] * 4, [False, False, False, False]]
    assert ev.num_skipped == 2 and set(ev.skipped) == bad
    assert all(any(os.path.basename(p) in r.getMessage() for r in caplog.records) for p in bad)
    # Sorted order: good, CMYK (red), PNG named .JPEG (red), grey: right colours, no black images.
    np.testing.assert_allclose(images[1].reshape(-1, 3).mean(0), [200 / 255, 0, 0], atol=0.02)
    np.testing.assert_allclose(images[2].reshape(-1, 3).mean(0), [200 / 255, 0, 0], atol=1e-3)
    assert np.allclose(images[3][..., 0], images[3][..., 2], atol=1e-5) and images[3].std() > 0.02
    assert images[0].std() > 0.05
    # Training keeps going past them, epoch after epoch (each bad file stands in for by a good one).
    it = data.make_train_iterator(cfg, batch_size_per_host=4, process_index=0, process_count=1, seed=0)
    for batch in _take(it, 4):  # 16 positions: two whole epochs of 6 files, then 4 more
        assert batch["view1"].shape == (4, 16, 16, 3) and np.isfinite(batch["view1"]).all()
    assert 4 <= it.num_skipped <= 6 and set(it.skipped) == bad


def test_a_source_that_never_decodes_fails_at_start(tmp_path):
    d = tmp_path / "train" / "x"
    d.mkdir(parents=True)
    for i in range(5):
        (d / f"{i}.JPEG").write_bytes(b"not an image at all" * (i + 1))
    with pytest.raises(RuntimeError, match="could be decoded"):
        data.make_train_iterator(_cfg("moby", source="folder", data_dir=str(tmp_path)), batch_size_per_host=2,
                                 process_index=0, process_count=1)


def test_missing_or_empty_directories_fail_naming_the_path(tmp_path):
    make = lambda root, split="train": data.make_train_iterator(  # noqa: E731
        _cfg("moby", source="folder", data_dir=root, train_split=split), batch_size_per_host=2,
        process_index=0, process_count=1)
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=missing):
        make(missing)
    with pytest.raises(ValueError, match=str(tmp_path / "train")):
        make(str(tmp_path))
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        make(str(tmp_path))
    (tmp_path / "train" / "cls").mkdir()
    (tmp_path / "train" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no image files"):
        make(str(tmp_path))
    with pytest.raises(ValueError, match=missing):
        data.make_eval_iterator(_cfg("moby", data_dir=missing), batch_size_per_host=2, process_index=0,
                                process_count=1)


# ------------------------------------------------------------------------------------ Fashion-MNIST
def _fmnist_dir():
    try:
        return fashion_mnist.find_dir()
    except ValueError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")


def test_fashion_mnist_through_the_same_api():
    _fmnist_dir()
    cfg = _cfg("moby", image_size=32)  # default source: fashion_mnist
    batch = next(data.make_train_iterator(cfg, batch_size_per_host=8, process_index=0, process_count=1))
    assert set(batch) == {"view1", "view2"} and batch["view1"].shape == (8, 32, 32, 3)
    # Eval at the native 28 px, no crop: the images are the IDX pixels, grey -> RGB, normalised.
    raw, labels = fashion_mnist.load("test")
    cfg = _cfg("linear", image_size=28, eval_crop_pct=1.0, eval_split="test[:50]")
    ev = data.make_eval_iterator(cfg, batch_size_per_host=16, process_index=1, process_count=2)  # examples 25..49
    got = np.concatenate([b["image"][b["mask"]] for b in ev])
    lab = np.concatenate([b["label"][b["mask"]] for b in ev])
    np.testing.assert_allclose(got * STD + MEAN, np.repeat(raw[25:50, :, :, None], 3, -1) / 255, atol=1e-5)
    np.testing.assert_array_equal(lab, labels[25:50])


def test_fashion_mnist_absent_tells_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", str(tmp_path / "sys"))
    monkeypatch.setattr(fashion_mnist, "CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"apt-get install dataset-fashion-mnist.*--fetch --cache"):
        fashion_mnist.find_dir()
    with pytest.raises(ValueError, match=str(tmp_path / "given")):
        fashion_mnist.find_dir(str(tmp_path / "given"))


def _idx(path, array, magic):
    header = np.array([magic, *array.shape], ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian/Ubuntu)")
def test_fetch_unpacks_the_debian_package_into_the_cache(tmp_path, monkeypatch):
    # A stand-in package (real .deb, built here) and a stand-in apt-get that "downloads" it offline.
    pkg = tmp_path / "pkg"
    payload = pkg / fashion_mnist.SYSTEM_DIR.lstrip("/")
    payload.mkdir(parents=True)
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text("Package: dataset-fashion-mnist\nVersion: 1\nArchitecture: all\n"
                                            "Maintainer: t <t@t>\nDescription: test\n")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        _idx(payload / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 2051)
        _idx(payload / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)), 2049)
    deb = tmp_path / "dataset-fashion-mnist_1_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(pkg), str(deb)], check=True, capture_output=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text(f'#!/bin/sh\n[ "$1" = download ] && cp "{deb}" . && exit 0\nexit 100\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cache = tmp_path / "cache"
    assert fashion_mnist.main(["--fetch", "--cache", str(cache)]) == 0
    images, labels = fashion_mnist.load("test", str(cache))
    assert images.shape == (4, 28, 28) and labels.shape == (4,)
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package' >&2\nexit 100\n")
    with pytest.raises(RuntimeError, match="apt-get update"):
        fashion_mnist.fetch(str(tmp_path / "cache2"))


# --------------------------------------------------------------------------------------------- TFDS
@pytest.mark.slow
def test_tfds_imagenet2012_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=10):
        cfg = _cfg("multicrop", source="imagenet2012", data_dir="/nonexistent/tfds", shuffle_buffer=10)
        make = lambda **kw: data.make_train_iterator(cfg, batch_size_per_host=4, process_index=0,  # noqa: E731
                                                     process_count=1, seed=0, **kw)
        first = _take(make(), 4)  # 16 positions: crosses the epoch of 10 (tiny odd images: crops upscale)
        for b in first:
            assert b["global1"].shape == (4, 16, 16, 3) and b["local2"].shape == (4, 8, 8, 3)
            assert all(np.isfinite(v).all() and (v >= LO - 1e-5).all() and (v <= HI + 1e-5).all()
                       for v in b.values())
        assert _equal(first, _take(make(), 4))
        assert _equal(first[2:], _take(make(start_step=2), 2))
        ev = data.make_eval_iterator(data.default_config("moby", source="imagenet2012", image_size=16,
                                                         data_dir="/nonexistent/tfds"),
                                     batch_size_per_host=4, process_index=0, process_count=1)
        batches = list(ev)
        assert len(batches) == len(ev) == 3 and sum(int(b["mask"].sum()) for b in batches) == 10
        assert all(0 <= lab < 1000 for b in batches for lab in b["label"][b["mask"]])


def test_tfds_not_prepared_fails_naming_the_directory(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        data.make_eval_iterator(data.default_config("moby", source="imagenet2012", data_dir=str(tmp_path)),
                                batch_size_per_host=2, process_index=0, process_count=1)


# ------------------------------------------------------------------------------------ global arrays
def test_host_batches_become_sharded_global_arrays(jpeg_folder):
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    cfg = _cfg("linear", source="folder", data_dir=jpeg_folder)
    it = data.make_train_iterator(cfg, batch_size_per_host=8, process_index=0, process_count=1)
    host = _take(it, 2)
    out = list(data.global_batches(iter(host), sharding, prefetch=1))
    assert len(out) == 2
    for g, h in zip(out, host):
        assert g["image"].shape == (8, 16, 16, 3) and g["image"].sharding == sharding
        assert len(g["image"].addressable_shards) == 8 and g["image"].addressable_shards[0].data.shape == (1, 16, 16, 3)
        np.testing.assert_array_equal(np.asarray(g["image"]), h["image"])
        np.testing.assert_array_equal(np.asarray(g["label"]), h["label"])


_WORKER = r"""
import json, os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
rank, port, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank)
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from swin_ssl import data
cfg = data.default_config("moby", source="folder", data_dir=root, eval_split="train", image_size=16)
ev = data.make_eval_iterator(cfg, batch_size_per_host=8)  # process index/count from jax
sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
total, shapes = 0, set()
for batch in data.global_batches(ev, sharding):
    shapes.add(batch["image"].shape)
    total += int(jax.jit(lambda m: m.sum())(batch["mask"]))
print("RESULT", json.dumps([jax.process_index(), jax.process_count(), len(ev), sorted(shapes), total]), flush=True)
"""


@pytest.mark.slow
def test_two_processes_form_global_eval_batches(colour_folder):
    """Two real JAX processes (localhost, gloo): each feeds its shard, the global batches hold all 37."""
    import socket
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**{k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}, "XLA_FLAGS": xla_flags(2)}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(rank), str(port), colour_folder], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    results = sorted(json.loads(line[len("RESULT "):]) for out in outputs for line in out.splitlines()
                     if line.startswith("RESULT "))
    assert len(results) == 2, outputs
    # 37 examples -> 19 + 18 per host -> 3 batches of 8 per host -> global batches of 16 over 4 devices,
    # whose masks add up to 37 in both processes.
    assert results == [[rank, 2, 3, [[16, 16, 16, 3]], 37] for rank in range(2)]
