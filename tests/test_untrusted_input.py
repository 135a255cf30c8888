"""Untrusted input: image folders and .pth files made by others cannot hang, exhaust memory or crash a run.

Image folders: a pixel budget checked from the header before decoding, a byte budget, regular files only, decode
errors skipped deterministically (named once, bounded by a maximum fraction), read errors retried and then fatal.
Checkpoints: every crafted .pth gives one ``error:`` line naming the file and the tensor, without allocating.
"""
import io
import os
import signal
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from swin_ssl import checkpoint
from swin_ssl import data
from swin_ssl.data import augment as aug
from swin_ssl.data import pipeline, sources
from test_convert import Evil, FakeCfgNode, moby_mlp, official_swin, to_torch
from test_reliability import ROOT, _assert_trees_identical, _finish, _steps, _train_py

try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch (test extra) makes the crafted checkpoints")
GiB = 2**30


# ---------------------------------------------------------------------------------------------- hostile images
def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(side: int = 23000) -> bytes:
    """A valid 16-bit grey PNG of side x side black pixels: ~1 MB on disk, 3.2 GB as decoded 16-bit RGB.

    Written chunk by chunk (PIL would have to hold the whole image to save it)."""
    row = b"\0" * (1 + 2 * side)  # filter byte + 16-bit samples
    packer, parts = zlib.compressobj(9), []
    for _ in range(side):
        parts.append(packer.compress(row))
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)  # 16-bit greyscale, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def _texture(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, 128 + 90 * np.sin(xx / 5.0 + rng.uniform(0, 6))], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


BAD = ("0_bomb.JPEG", "1_empty.JPEG", "2_truncated.JPEG", "3_text.JPEG")  # sorted first: the start-up probe meets them
ODD_BUT_GOOD = ("b_cmyk.JPEG", "c_16bit.png", "d_palette.png")


def hostile_folder(root: str, *, with_fifo: bool = True) -> dict[str, str]:
    """`root/train/{a,b}/...`: 8 photos, 3 odd but valid images, 4 undecodable files and a FIFO named .JPEG."""
    rng = np.random.default_rng(0)
    a, b = os.path.join(root, "train", "a"), os.path.join(root, "train", "b")
    os.makedirs(a)
    os.makedirs(b)
    files = {}
    for i in range(8):
        photo = Image.fromarray(_texture(rng, int(rng.integers(24, 64)), int(rng.integers(24, 64))))
        files[os.path.join(a if i % 2 else b, f"photo{i}.JPEG")] = _encoded(photo, "JPEG", quality=90)
    red = Image.fromarray(np.full((30, 40, 3), (200, 10, 10), np.uint8))
    files[os.path.join(b, "b_cmyk.JPEG")] = _encoded(red.convert("CMYK"), "JPEG", quality=95)
    files[os.path.join(b, "c_16bit.png")] = _encoded(Image.fromarray(
        (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)), "PNG")
    palette = red.convert("P", palette=Image.ADAPTIVE, colors=4)
    files[os.path.join(b, "d_palette.png")] = _encoded(palette, "PNG", transparency=0)
    photo = _encoded(Image.fromarray(_texture(rng, 60, 60)), "JPEG")
    files[os.path.join(a, "0_bomb.JPEG")] = bomb_png()
    files[os.path.join(a, "1_empty.JPEG")] = b""
    files[os.path.join(a, "2_truncated.JPEG")] = photo[: len(photo) // 2]
    files[os.path.join(a, "3_text.JPEG")] = b"user,label\nalice,3\n" * 20
    for path, content in files.items():
        with open(path, "wb") as f:
            f.write(content)
    if with_fifo:
        os.mkfifo(os.path.join(a, "4_fifo.JPEG"))  # nobody ever writes to it: reading it blocks forever
    return {"bad": [os.path.join(a, n) for n in BAD], "fifo": os.path.join(a, "4_fifo.JPEG"),
            "good": [os.path.join(b, n) for n in ODD_BUT_GOOD]}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hostile"))
    return root, hostile_folder(root)


def _cfg(**kw):
    base = dict(source="folder", image_size=16, blur_sigma=(0.1, 0.5), prefetch=1, max_skip_fraction=0.5)
    return data.default_config("moby", **dict(base, **kw))


def test_the_bomb_is_refused_from_its_header_and_odd_images_decode(hostile):
    root, files = hostile
    bomb = open(files["bad"][0], "rb").read()
    assert len(bomb) < 2 * 2**20
    with pytest.raises(Image.DecompressionBombError):  # PIL's own verdict on the file
        Image.open(io.BytesIO(bomb))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"pixel budget of 89478485 .* \[23000 23000\]"):
        tf.function(aug.decode_rgb, autograph=False)(tf.constant(bomb))
    for path in files["good"]:  # CMYK JPEG, palette PNG with transparency: the RGB PIL sees; 16-bit: the high byte
        got = aug.decode_rgb(tf.constant(open(path, "rb").read())).numpy().astype(int)
        image = Image.open(path)
        want = (np.asarray(image)[..., None] >> 8) if "16bit" in path else np.asarray(image.convert("RGB"))
        np.testing.assert_allclose(got, np.broadcast_to(want, (30, 40, 3)), atol=3 if "cmyk" in path else 0)
    small = _encoded(Image.fromarray(np.zeros((30, 40, 3), np.uint8)), "PNG")
    with pytest.raises(tf.errors.InvalidArgumentError, match="pixel budget of 1000"):
        aug.decode_rgb(tf.constant(small), max_pixels=1000)
    with pytest.raises(tf.errors.InvalidArgumentError, match="byte budget of 50"):
        aug.decode_rgb(tf.constant(small), max_bytes=50)


def test_listing_keeps_regular_files_within_the_byte_budget(hostile):
    root, files = hostile
    paths, _, _, left_out = sources.list_folder(root, "train")
    assert files["fifo"] not in paths and left_out == [f"{files['fifo']}: not a regular file"]
    assert len(paths) == 15 and set(files["bad"]) <= set(paths)
    _, _, _, left_out = sources.list_folder(root, "train", max_bytes=100_000)
    assert left_out[0].startswith(files["bad"][0] + ": ") and "byte budget of 100000" in left_out[0]


def test_bad_files_are_skipped_named_once_with_the_reason(hostile, caplog):
    root, files = hostile
    caplog.set_level("WARNING")
    it = data.make_train_iterator(_cfg(data_dir=root), batch_size_per_host=15, process_index=0, process_count=1)
    batches = [next(it) for _ in range(2)]  # 2 epochs: every listed file met twice
    assert all(np.isfinite(b["view1"]).all() for b in batches)
    assert it.num_skipped == 8 and sorted(set(it.skipped)) == files["bad"]
    messages = [r.getMessage() for r in caplog.records]
    for path, why in zip(files["bad"], ("pixel budget", "not an image", "JPEG", "not an image")):
        named = [m for m in messages if path in m]
        assert len(named) == 1 and why in named[0], (path, named)
    assert not any(path in m for path in files["good"] for m in messages)


def _stack(batches):
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.slow
def test_a_resumed_stream_equals_the_straight_one_with_a_corrupt_file(hostile):
    root, _ = hostile
    make = lambda step: data.make_train_iterator(  # noqa: E731
        _cfg(data_dir=root), batch_size_per_host=4, process_index=0, process_count=1, seed=3, start_step=step)
    straight = make(0)
    want = [next(straight) for _ in range(8)]
    assert straight.num_skipped > 0
    resumed = make(5)
    got = [next(resumed) for _ in range(3)]
    for k, v in _stack(want[5:]).items():
        np.testing.assert_array_equal(_stack(got)[k], v)


def test_too_many_bad_files_stop_the_run_naming_them(hostile):
    root, files = hostile
    it = data.make_train_iterator(_cfg(data_dir=root, max_skip_fraction=0.1), batch_size_per_host=5,
                                  process_index=0, process_count=1)
    with pytest.raises(RuntimeError, match=r"over data.max_skip_fraction=0.1") as info:
        for _ in range(3):
            next(it)
    assert files["bad"][0] in str(info.value) and "pixel budget" in str(info.value)


def _good_folder(root, n=8):
    rng = np.random.default_rng(1)
    for i in range(n):
        os.makedirs(os.path.join(root, "train", "c"), exist_ok=True)
        Image.fromarray(_texture(rng, 20, 24)).save(os.path.join(root, "train", "c", f"{i}.JPEG"))
    return sorted(os.path.join(root, "train", "c", f"{i}.JPEG") for i in range(n))


@pytest.mark.slow
@pytest.mark.parametrize("transient", [True, False])
def test_read_errors_are_retried_then_stop_never_skipped(tmp_path, monkeypatch, transient):
    paths = _good_folder(str(tmp_path))
    make = lambda: data.make_train_iterator(  # noqa: E731
        _cfg(data_dir=str(tmp_path), read_retries=3), batch_size_per_host=4, process_index=0, process_count=1)
    reference = make()
    want = [next(reference) for _ in range(4)]
    it = make()  # the stand-ins are read now; the file vanishes afterwards
    victim = paths[-1]
    content = open(victim, "rb").read()
    os.remove(victim)
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        if transient:
            with open(victim, "wb") as f:
                f.write(content)
    monkeypatch.setattr(pipeline.time, "sleep", sleep)
    if transient:
        got = [next(it) for _ in range(4)]
        assert waits == [1.0] and it.num_skipped == 0
        for k, v in _stack(want).items():
            np.testing.assert_array_equal(_stack(got)[k], v)
    else:
        with pytest.raises(OSError, match=r"failed 4 times \(data.read_retries=3\).*" + victim):
            for _ in range(4):
                next(it)
        assert waits == [1.0, 2.0, 4.0] and it.num_skipped == 0


# ------------------------------------------------------------------------------------ a training run over it
# Runs a command as its child and prints that child's peak RSS (getrusage(RUSAGE_CHILDREN)). A process started by
# fork + exec keeps the peak RSS of the process it was forked from (Linux): measuring from a small parent keeps
# pytest's own memory out of the number.
_MEASURE = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def _measured(*command: str, env: dict | None = None) -> tuple[int, str, int]:
    """(exit code, stderr, peak RSS in bytes) of `command` run from the repository root."""
    r = subprocess.run([sys.executable, "-c", _MEASURE, *command], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}, timeout=900)
    return r.returncode, r.stderr, int(r.stdout.split()[-1]) * 1024


FOLDER_FLAGS = ["--config.data.name=image_folder", "--config.data.num_train_examples=15",
                "--config.data.max_skip_fraction=0.5", "--config.async_checkpointing=False"]


@pytest.mark.slow
def test_training_over_a_hostile_folder_finishes_names_each_bad_file_once_and_resumes_exactly(hostile, tmp_path):
    root, files = hostile
    config = "configs/moby_swin_tiny.py:smoke"
    flags = [*FOLDER_FLAGS, f"--config.data.data_dir={root}"]
    straight = tmp_path / "straight"  # the command _train_py runs, under the RSS measurement
    rc, log, peak = _measured(sys.executable, "train.py", "--config", config, "--workdir", str(straight), *flags)
    assert rc == 0, log[-3000:]
    print(f"peak RSS of the training run: {peak / GiB:.2f} GiB")
    assert peak < 4 * GiB, f"peak RSS {peak / GiB:.2f} GiB"
    for path in files["bad"] + [files["fifo"]]:
        assert log.count(path) == 1, (path, [line for line in log.splitlines() if path in line])
    assert not any(path in log for path in files["good"])
    assert _steps(straight) == [3, 6]

    killed = tmp_path / "killed"
    hook = ["--config.evals.fn=tests.hooks:sigkill_at", "--config.evals.every_steps=1"]
    rc, log = _finish(_train_py(killed, config, *flags, *hook, env={"SWIN_SSL_KILL_AT": "5"}), timeout=900)
    assert rc == -signal.SIGKILL and _steps(killed) == [3], log[-3000:]
    rc, log = _finish(_train_py(killed, config, *flags), timeout=900)
    assert rc == 0 and "Restoring checkpoint of step 3" in log, log[-3000:]
    want, want_meta = checkpoint.restore_raw(str(straight))
    got, got_meta = checkpoint.restore_raw(str(killed))
    assert want_meta["step"] == got_meta["step"] == 6
    _assert_trees_identical(got, want, "state after kill + resume over the hostile folder")


# ------------------------------------------------------------------------------------------- crafted checkpoints
class Harmless:
    """A pickled object of a class nobody blocks: kept as inert data on its own."""


def _convert(*args: str) -> tuple[int, str, int]:
    """`python -m swin_ssl.convert ARGS` -> (exit code, stderr, peak RSS of that process in bytes)."""
    return _measured(sys.executable, "-m", "swin_ssl.convert", *args, env={"JAX_PLATFORMS": "cpu"})


def _backbone(rng):
    return to_torch(official_swin(rng))


def _moby(rng, **changes):
    model = {}
    model.update({"encoder." + k: v for k, v in official_swin(rng).items()})
    model.update({"encoder_k." + k: v for k, v in official_swin(rng).items()})
    for prefix, d_in in (("projector.", 32), ("projector_k.", 32), ("predictor.", 8)):
        model.update(moby_mlp(rng, prefix, d_in, 24, 8))
    model.update({"queue1": _rand(rng, 8, 40), "queue2": _rand(rng, 8, 40), "queue_ptr": np.array([16], np.int64)})
    return {"model": {**to_torch(model), **changes}, "config": FakeCfgNode(MODEL=FakeCfgNode(TYPE="moby"))}


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


CRAFTED = {  # name -> (checkpoint maker, extra import flags, what the error line must say)
    "bf16_expanded": (lambda rng: {"model": {**_backbone(rng), "head.weight": torch.zeros(
        (), dtype=torch.bfloat16).expand(1 << 18, 1 << 18)}}, [], "'model.head.weight' of shape [262144, 262144]"),
    "fp8": (lambda rng: {"model": {**_backbone(rng), "norm.weight": torch.zeros(32, dtype=torch.float8_e4m3fn)}},
            [], "'model.norm.weight' has dtype float8_e4m3fn"),
    "sparse": (lambda rng: {"model": {**_backbone(rng), "norm.weight": torch.ones(32).to_sparse()}},
               [], "'model.norm.weight' is torch.sparse_coo"),
    "empty_queue_ptr": (lambda rng: _moby(rng, queue_ptr=torch.zeros(0, dtype=torch.int64)), [], "queue_ptr"),
    "huge_classifier": (lambda rng: {"model": {**_backbone(rng), "head.weight": torch.zeros(1 << 31, 0)}},
                        ["--non-strict"], "inferred from 'head.weight' [2147483648,0]"),
    "huge_moby_head": (lambda rng: _moby(rng, **{"projector.linear_out.weight": torch.zeros(1 << 31, 0)}),
                       ["--non-strict"], "projector head inferred from the tensors under 'projector.'"),
}


@needs_torch
@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_checkpoints_give_one_error_line_without_allocating(name, tmp_path):
    make, flags, says = CRAFTED[name]
    path = str(tmp_path / f"{name}.pth")
    torch.save(make(np.random.default_rng(0)), path)
    commands = [["import", path, "--model", "swin_test", "--out", str(tmp_path / "out.msgpack"), *flags]]
    if name in ("bf16_expanded", "fp8", "sparse"):
        commands.append(["inspect", path])
    for command in commands:
        rc, err, peak = _convert(*command)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 1 and len(errors) == 1 and "Traceback" not in err, (command[0], err[-2000:])
        assert path in errors[0] and says in errors[0], errors[0]
        assert peak < 1.5 * GiB, f"{command[0]}: peak RSS {peak / GiB:.2f} GiB"
    assert not os.path.exists(tmp_path / "out.msgpack")


@needs_torch
def test_torchscript_and_a_late_os_system_are_refused_and_nothing_runs(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("SWIN_SSL_EVIL_MARK", str(mark))
    scripted = str(tmp_path / "scripted.pth")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    late = str(tmp_path / "late.pth")  # weights_only stops at Harmless; the fallback must still see os.system
    torch.save({"model": _backbone(np.random.default_rng(0)), "config": Harmless(), "evil": Evil()}, late)
    for path, says in ((scripted, "TorchScript archive"), (late, "blocked global posix.system")):
        for command in (["import", path, "--model", "swin_test", "--out", str(tmp_path / "o.msgpack")],
                        ["inspect", path]):
            rc, err, _ = _convert(*command)
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert rc == 1 and len(errors) == 1 and path in errors[0] and says in errors[0], err[-2000:]
    assert not mark.exists() and not os.path.exists(tmp_path / "o.msgpack")


@needs_torch
@pytest.mark.parametrize("option,value,rule", [("--window-size", "0", ">= 1"), ("--num-classes", "-1", ">= 0"),
                                               ("--img-size", "0", ">= 1"), ("--norm-eps", "nan", "positive")])
def test_numeric_options_are_validated(option, value, rule, tmp_path):
    path = str(tmp_path / "good.pth")  # a valid checkpoint: only the option is wrong
    torch.save({"model": _backbone(np.random.default_rng(0))}, path)
    rc, err, _ = _convert("import", path, "--model", "swin_test", "--out", str(tmp_path / "o"), option, value)
    errors = [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]
    assert rc == 2 and len(errors) == 1 and option in errors[0] and rule in errors[0] and "Traceback" not in err, err


@pytest.mark.parametrize("field,value", [("max_image_pixels", 0), ("max_image_bytes", -1), ("read_retries", -1),
                                         ("max_skip_fraction", 1.5)])
def test_limits_out_of_range_fail_naming_the_field(hostile, field, value):
    root, _ = hostile
    with pytest.raises(ValueError, match=rf"^data.{field}={value}: must be"):
        data.make_train_iterator(_cfg(data_dir=root, **{field: value}), batch_size_per_host=2, process_index=0,
                                 process_count=1)


def test_fashion_mnist_reads_only_what_a_sane_header_announces(tmp_path):
    """A gzip stream that inflates to 314 MB (a header declaring 400k images, all there) is refused from its header."""
    import gzip

    from swin_ssl.data import fashion_mnist
    n = 400_000
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(np.array([2051, n, 28, 28], ">u4").tobytes())
        for _ in range(n // 10_000):
            f.write(bytes(10_000 * 28 * 28))
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(np.array([2049, n], ">u4").tobytes() + bytes(n))
    for name, magic, shape in (("t10k-images-idx3-ubyte.gz", 2051, (2, 28, 28)),
                               ("t10k-labels-idx1-ubyte.gz", 2049, (2,))):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(np.array([magic, *shape], ">u4").tobytes() + bytes(int(np.prod(shape))))
    assert len(fashion_mnist.load("test", str(tmp_path))[0]) == 2
    with pytest.raises(ValueError, match=r"declares shape \(400000, 28, 28\) \(313600000 bytes\), over 268435456"):
        fashion_mnist.load("train", str(tmp_path))
