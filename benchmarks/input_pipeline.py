"""Input-pipeline throughput per CPU core: MoBY two views and DINO/EsViT multi-crop (2x224 + 8x96).

Images are real photos shipped by scikit-learn, scikit-image and matplotlib, re-encoded as ~640x427 JPEGs
(the size the baselines were measured on) into a temporary `train/<class>/*.JPEG` folder.

Ours: TensorFlow restricted to one thread (intra/inter-op 1, tf.data private pool 1, map parallelism 1).
Reference: the official recipes written with the real torchvision transforms on PIL images (PIL decode,
RandomResizedCrop, RandomHorizontalFlip, ColorJitter, RandomGrayscale, the official PIL GaussianBlur
class, RandomSolarize, ToTensor + Normalize), `torch.set_num_threads(1)`, run in a subprocess of a Python
that has torchvision (this one, `--torch-python`, `$TORCH_PYTHON` or /work/torchref/bin/python); without
one, a PIL + NumPy copy of the same recipes stands in (marked "PIL copy"). Both processes are pinned to
the same single core (unless `--no-pin`) and timed alternately, `--repeats` times each; the figures are
medians of images per second of CPU time (robust when other jobs share the machine; equal to the wall
rate on an idle core), and the ratio is ours / reference measured in the same run. For ours the CPU time
of a repeat runs from tf.data's buffers full and its threads idle, through the timed window, to buffers
full and threads idle again: exactly the work of the images the window took, prefetching included.

`--no-antialias-rows` also times `antialias=False` (plain bilinear/bicubic; aliases when shrinking, unlike
PIL). The documented baselines (2-vCPU Cascade Lake CI machine kind) are printed for reference only.

    python benchmarks/input_pipeline.py [--images 256] [--repeats 5] [--no-pin] [--no-antialias-rows]
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BASELINES = {"moby": 56.0, "multicrop": 25.0}  # img/s/core, torchvision/PIL on the CI machine kind
TARGET = 1.5


def _sample_photos() -> list[str]:
    import matplotlib
    import skimage
    import sklearn
    paths = glob.glob(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "*.jpg"))
    paths += [os.path.join(os.path.dirname(skimage.__file__), "data", f"{n}.jpg")
              for n in ("rocket", "hubble_deep_field", "retina")]
    paths += [os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")]
    return [p for p in paths if os.path.isfile(p)]


def write_folder(root: str, copies: int = 4) -> int:
    """~640x427 JPEGs (some portrait) in `root/train/<class>/`; returns the number of files."""
    from PIL import Image, ImageOps
    rng = random.Random(0)
    n = 0
    for k, path in enumerate(_sample_photos()):
        src = Image.open(path).convert("RGB")
        class_dir = os.path.join(root, "train", f"n{k:08d}")
        os.makedirs(class_dir, exist_ok=True)
        for c in range(copies):
            size = (640, 427) if c % 4 != 3 else (427, 640)
            # A random crop of the photo with the target aspect, resized: distinct files, natural content.
            w, h = src.size
            aspect = size[0] / size[1]
            cw = min(w, int(h * aspect)) * rng.uniform(0.7, 1.0)
            ch = cw / aspect
            x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            img = src.crop((int(x0), int(y0), int(x0 + cw), int(y0 + ch))).resize(size, Image.BICUBIC)
            if c % 2:
                img = ImageOps.mirror(img)
            img.save(os.path.join(class_dir, f"img_{c}.JPEG"), quality=rng.choice([85, 90, 95]))
            n += 1
    return n


# ------------------------------------------------------------------------------------------- ours (TF)
class TFPipeline:
    """Our training iterator, timed in windows; CPU time charged per repeat (see the module doc)."""

    def __init__(self, root: str, recipe: str, batch: int = 32, **overrides):
        from swin_ssl import data
        cfg = data.default_config(recipe, source="folder", data_dir=root, threads=1, num_parallel_calls=1,
                                  prefetch=1, **overrides)
        self.it = data.make_train_iterator(cfg, batch_size_per_host=batch, process_index=0, process_count=1,
                                           seed=0)
        self.batch = batch
        for _ in range(2):  # warm-up: tracing, first allocations
            next(self.it)
        self.cpu_rates, self.wall_rates = [], []

    @staticmethod
    def _runnable_threads() -> int:
        """Threads of this process, other than this one, that run or wait for a CPU (Linux; else 0)."""
        me, n = str(threading.get_native_id()), 0
        try:
            for tid in os.listdir("/proc/self/task"):
                if tid != me:
                    with open(f"/proc/self/task/{tid}/stat") as f:
                        n += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except OSError:
            return 0
        return n

    @classmethod
    def _quiesce(cls, timeout: float = 60.0) -> float:
        """Waits until tf.data's threads have filled their buffers and idle; returns the CPU time then.

        Idle = under 2 ms of CPU in 0.1 s and no thread runnable (on a loaded core a starved thread uses
        no CPU without being idle).
        """
        end = time.perf_counter() + timeout
        cpu = time.process_time()
        while time.perf_counter() < end:
            time.sleep(0.1)
            now = time.process_time()
            if now - cpu < 0.002 and not cls._runnable_threads():
                return now
            cpu = now
        return cpu

    def time(self, images: int) -> None:
        cpu = self._quiesce()
        steps = max(1, math.ceil(images / self.batch))
        wall = time.perf_counter()
        for _ in range(steps):
            next(self.it)
        self.wall_rates.append(steps * self.batch / (time.perf_counter() - wall))
        # Charge the refill of the buffers to this window: CPU from idle-and-full to idle-and-full again.
        self.cpu_rates.append(steps * self.batch / (self._quiesce() - cpu))


# ---------------------------------------------------------------- torchvision reference (subprocess)
def _torchvision_recipe(recipe: str):
    """The official recipes (Transformer-SSL data/build.py, DINO/EsViT DataAugmentationDINO) in torchvision."""
    import torch
    from PIL import Image, ImageFilter
    from torchvision import transforms as T
    torch.set_num_threads(1)
    rng = random.Random(0)

    class GaussianBlur:  # the official class (MoBY/DINO): PIL's GaussianBlur with radius ~ U(0.1, 2.0)
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            if rng.random() >= self.p:
                return img
            return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))

    normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    flip_jitter_grey = [T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                        T.RandomGrayscale(p=0.2)]

    def view(size, scale, interp, blur_p, solarize_p):
        ops = [T.RandomResizedCrop(size, scale=scale, interpolation=interp), *flip_jitter_grey, GaussianBlur(blur_p)]
        if solarize_p:
            ops.append(T.RandomSolarize(128, p=solarize_p))
        return T.Compose(ops + [normalize])

    bilinear, bicubic = T.InterpolationMode.BILINEAR, T.InterpolationMode.BICUBIC
    if recipe == "moby":
        views = [view(224, (0.08, 1.0), bilinear, 1.0, 0.0), view(224, (0.08, 1.0), bilinear, 0.1, 0.2)]
    else:
        views = [view(224, (0.4, 1.0), bicubic, 1.0, 0.0), view(224, (0.4, 1.0), bicubic, 0.1, 0.2)]
        views += [view(96, (0.05, 0.4), bicubic, 0.5, 0.0)] * 8

    def load_and_transform(path):
        with open(path, "rb") as f:  # torchvision's default_loader (pil_loader)
            img = Image.open(f).convert("RGB")
        return [v(img) for v in views]
    return load_and_transform


def _reference_worker(root: str, recipe: str, kind: str) -> None:
    """Runs in the reference Python: reads `N` lines from stdin, times N images, prints JSON."""
    fn = _torchvision_recipe(recipe) if kind == "torchvision" else _pil_recipe(recipe)
    files = sorted(glob.glob(os.path.join(root, "train", "*", "*.JPEG")))
    for f in files[:4]:
        fn(f)
    i = 0
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        images = int(line)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(images):
            fn(files[i % len(files)])
            i += 1
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(json.dumps({"cpu": images / cpu, "wall": images / wall}), flush=True)


class Reference:
    """The reference recipe in a subprocess pinned like us; `time(n)` times n images there."""

    def __init__(self, python: str, kind: str, root: str, recipe: str, pin: set | None):
        cmd = [python, os.path.abspath(__file__), "--reference-worker", kind, root, recipe]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, pin)) if pin else None)
        assert json.loads(self.proc.stdout.readline())["ready"]
        self.cpu_rates, self.wall_rates = [], []

    def time(self, images: int) -> None:
        self.proc.stdin.write(f"{images}\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        self.cpu_rates.append(out["cpu"])
        self.wall_rates.append(out["wall"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _has_torchvision(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import torch, torchvision"], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_reference(requested: str | None) -> tuple[str, str]:
    """(python, kind): the first Python with torchvision, else this one with the PIL copy."""
    candidates = [requested, os.environ.get("TORCH_PYTHON"), sys.executable, "/work/torchref/bin/python"]
    for python in candidates:
        if python and os.path.exists(python) and _has_torchvision(python):
            return python, "torchvision"
    if requested:
        raise SystemExit(f"--torch-python {requested}: torch/torchvision not importable there")
    return sys.executable, "pil"


# ---------------------------------------------- PIL copy of the recipes (when torchvision is missing)
def _pil_recipe(recipe: str):
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    rng = random.Random(0)

    def rrc(img, size, scale, interp):
        w, h = img.size
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(*scale)
            ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
                return img.crop((left, top, left + cw, top + ch)).resize((size, size), interp)
        return img.resize((size, size), interp)

    def hue(img, delta):
        h, s, v = img.convert("HSV").split()
        h = Image.fromarray((np.asarray(h, np.uint8) + np.uint8(int(delta * 255) % 256)).astype(np.uint8), "L")
        return Image.merge("HSV", (h, s, v)).convert("RGB")

    def jitter(img):
        ops = [lambda x: ImageEnhance.Brightness(x).enhance(rng.uniform(0.6, 1.4)),
               lambda x: ImageEnhance.Contrast(x).enhance(rng.uniform(0.6, 1.4)),
               lambda x: ImageEnhance.Color(x).enhance(rng.uniform(0.8, 1.2)),
               lambda x: hue(x, rng.uniform(-0.1, 0.1))]
        rng.shuffle(ops)
        for op in ops:
            img = op(img)
        return img

    def view(img, size, scale, interp, blur_p, sol_p):
        img = rrc(img, size, scale, interp)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < 0.8:
            img = jitter(img)
        if rng.random() < 0.2:
            img = img.convert("L").convert("RGB")
        if rng.random() < blur_p:
            img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
        if rng.random() < sol_p:
            img = ImageOps.solarize(img, 128)
        x = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0  # ToTensor
        return (x - mean[:, None, None]) / std[:, None, None]        # Normalize

    def moby(path):
        img = Image.open(path).convert("RGB")
        return [view(img, 224, (0.08, 1), Image.BILINEAR, 1.0, 0.0),
                view(img, 224, (0.08, 1), Image.BILINEAR, 0.1, 0.2)]

    def multicrop(path):
        img = Image.open(path).convert("RGB")
        out = [view(img, 224, (0.4, 1), Image.BICUBIC, 1.0, 0.0), view(img, 224, (0.4, 1), Image.BICUBIC, 0.1, 0.2)]
        return out + [view(img, 96, (0.05, 0.4), Image.BICUBIC, 0.5, 0.0) for _ in range(8)]
    return moby if recipe == "moby" else multicrop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="images per timed repeat (ours)")
    parser.add_argument("--ref-images", type=int, default=0, help="images per repeat of the reference (0: images/4)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats; medians are reported")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin to one core")
    parser.add_argument("--torch-python", default=None, help="a Python with torch + torchvision for the reference")
    parser.add_argument("--recipes", default="moby,multicrop", help="comma-separated subset of moby,multicrop")
    parser.add_argument("--no-antialias-rows", dest="aa_rows", action="store_true",
                        help="also time antialias=False (faster, aliases when shrinking; not PIL's semantics)")
    parser.add_argument("--reference-worker", nargs=3, metavar=("KIND", "ROOT", "RECIPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_worker:
        _reference_worker(args.reference_worker[1], args.reference_worker[2], args.reference_worker[0])
        return
    pin = None
    if args.pin and hasattr(os, "sched_setaffinity"):
        pin = {sorted(os.sched_getaffinity(0))[0]}
        os.sched_setaffinity(0, pin)
    from swin_ssl import host_memory

    host_memory.keep_freed_memory_mapped()  # as train.py does on the CPU (the pipeline shares its process)
    ref_python, ref_kind = find_reference(args.torch_python)
    ref_images = args.ref_images or max(16, args.images // 4)
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        n = write_folder(root)
        print(f"{n} JPEG files (~640x427) in {root}; TF 1 thread; pinned to core {sorted(pin) if pin else None}; "
              f"reference: {ref_kind} ({ref_python}); {args.repeats} alternating repeats", flush=True)
        names = {"moby": "MoBY 2x224", "multicrop": "multi-crop 2x224+8x96"}
        for recipe in args.recipes.split(","):
            variants = [("", {})] + ([(" no-AA", {"antialias": False})] if args.aa_rows else [])
            pipes = [(name, TFPipeline(root, recipe, **kw)) for name, kw in variants]
            ref = Reference(ref_python, ref_kind, root, recipe, pin)
            for _ in range(args.repeats):
                for _, pipe in pipes:
                    pipe.time(args.images)
                ref.time(ref_images)
            ref.close()
            ref_cpu = statistics.median(ref.cpu_rates)
            for suffix, pipe in pipes:
                rows.append((names[recipe] + suffix, recipe, pipe.cpu_rates, ref_cpu, ref.cpu_rates))
    load_after = os.getloadavg()
    ref_name = "torchvision" if ref_kind == "torchvision" else "PIL copy"
    print(f"\nmedians of {args.repeats} repeats, images/s per second of CPU time, one core")
    print(f"{'pipeline':<30}{'ours':>8}{'range':>15}{ref_name:>13}{'range':>15}{'ratio':>8}{'vs doc':>8}")
    for name, recipe, ours, ref_cpu, ref_all in rows:
        med = statistics.median(ours)
        print(f"{name:<30}{med:>8.1f}{f'{min(ours):.0f}-{max(ours):.0f}':>15}{ref_cpu:>13.1f}"
              f"{f'{min(ref_all):.0f}-{max(ref_all):.0f}':>15}{med / ref_cpu:>7.2f}x{med / BASELINES[recipe]:>7.1f}x")
    print(f"target: ours / {ref_name} on the same core >= {TARGET}x; 'vs doc' = ours / documented CI baseline "
          f"{BASELINES} (another machine)")
    print(f"load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, "
          f"after {tuple(round(x, 2) for x in load_after)}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
