"""Input-pipeline throughput per CPU core: MoBY two views and DINO/EsViT multi-crop (2x224 + 8x96).

Images are real photos shipped by scikit-learn, scikit-image and matplotlib, re-encoded as ~640x427 JPEGs
(the size the baselines were measured on) into a temporary `train/<class>/*.JPEG` folder. TensorFlow is
restricted to one thread (intra/inter-op 1, tf.data private pool 1, map parallelism 1) and, by default,
the process is pinned to one core, so the figure is per core.

Two figures per pipeline: images per second of wall time, and images per second of CPU time consumed by
the process (robust when other jobs share the machine; the two agree on an idle machine).
Baselines: the official torchvision/PIL recipes measured on the CI machine kind (2 vCPU Xeon Cascade Lake,
shared/reference/data_and_baselines.md); on another CPU that ratio mixes machines. `--pil` also times, side
by side, a PIL + NumPy re-implementation of those torchvision recipes (same ops, same order), which gives a
same-machine ratio. About half of our per-image time is the antialiased resize (TF's ScaleAndTranslate);
`--no-antialias-rows` shows what `antialias=False` (aliasing when shrinking, unlike PIL) would give.

    python benchmarks/input_pipeline.py [--images 256] [--repeats 3] [--no-pin] [--pil] [--no-antialias-rows]
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import random
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
def time_tf(root: str, recipe: str, images: int, repeats: int, batch: int = 32, **overrides) -> tuple[float, float]:
    """Best of `repeats` timings (shared machines only ever make a run slower) of `images` images."""
    from swin_ssl import data
    cfg = data.default_config(recipe, source="folder", data_dir=root, threads=1, num_parallel_calls=1, prefetch=1,
                              **overrides)
    it = data.make_train_iterator(cfg, batch_size_per_host=batch, process_index=0, process_count=1, seed=0)
    for _ in range(2):  # warm-up: tracing, first allocations
        next(it)
    steps = max(1, math.ceil(images / batch))
    best_wall, best_cpu = 0.0, 0.0
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            next(it)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best_wall, best_cpu = max(best_wall, steps * batch / wall), max(best_cpu, steps * batch / cpu)
    return best_wall, best_cpu


# ------------------------------------------------------------------ PIL reference (torchvision recipe)
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


def time_pil(root: str, recipe: str, images: int, repeats: int) -> tuple[float, float]:
    fn = _pil_recipe(recipe)
    files = sorted(glob.glob(os.path.join(root, "train", "*", "*.JPEG")))
    for f in files[:4]:
        fn(f)
    best_wall, best_cpu = 0.0, 0.0
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(images):
            fn(files[i % len(files)])
        best_wall = max(best_wall, images / (time.perf_counter() - wall))
        best_cpu = max(best_cpu, images / (time.process_time() - cpu))
    return best_wall, best_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="images timed per pipeline")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the process to one core")
    parser.add_argument("--pil", action="store_true", help="also time the PIL re-implementation side by side")
    parser.add_argument("--repeats", type=int, default=3, help="timings per pipeline; the best is reported")
    parser.add_argument("--no-antialias-rows", dest="aa_rows", action="store_true",
                        help="also time antialias=False (faster, aliases when shrinking; not PIL's semantics)")
    args = parser.parse_args()
    if args.pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    with tempfile.TemporaryDirectory() as root:
        n = write_folder(root)
        print(f"{n} JPEG files (~640x427) in {root}; TF 1 thread; pinned to one core: {args.pin}")
        rows = []
        for recipe, name in (("moby", "MoBY 2x224"), ("multicrop", "multi-crop 2x224+8x96")):
            wall, cpu = time_tf(root, recipe, args.images, args.repeats)
            pil = time_pil(root, recipe, max(16, args.images // 4), args.repeats) if args.pil else None
            rows.append((name, wall, cpu, BASELINES[recipe], pil))
            if args.aa_rows:
                wall, cpu = time_tf(root, recipe, args.images, args.repeats, antialias=False)
                rows.append((name + " no-AA", wall, cpu, BASELINES[recipe], None))
    print(f"\n{'pipeline':<30}{'img/s/core (wall)':>19}{'img/s/core (cpu)':>18}{'baseline':>10}{'ratio':>8}"
          + (f"{'PIL here (cpu)':>16}{'ratio':>8}" if args.pil else ""))
    for name, wall, cpu, base, pil in rows:
        line = f"{name:<30}{wall:>19.1f}{cpu:>18.1f}{base:>10.1f}{cpu / base:>7.2f}x"
        if pil is not None:
            line += f"{pil[1]:>16.1f}{cpu / pil[1]:>7.2f}x"
        print(line)
    print(f"target: ratio >= {TARGET}x (ratio = cpu figure / baseline)")


if __name__ == "__main__":
    main()
