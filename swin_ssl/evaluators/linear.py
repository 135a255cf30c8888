"""Linear probe on a frozen backbone: the EsViT/DINO and MoBY protocols (docs/fidelity.md).

Two protocols, selected by ``protocol`` in the config (``protocol_defaults``):

* ``esvit`` (also DINO): frozen EMA teacher in eval mode; Swin features = the average-pooled outputs of the
  last 4 blocks concatenated (2304-d for Swin-T), ViT = CLS of the last 4 blocks; linear layer with weight
  normal(0, 0.01), bias 0, no BatchNorm; SGD momentum 0.9, lr 1e-3 x batch/256, cosine to 0 stepped per epoch,
  100 epochs, no weight decay, plain cross-entropy; reports the best test accuracy over epochs.
* ``moby``: the online encoder's pooled features, backbone kept in train mode (stochastic depth active);
  linear layer trunc-normal(0.02) ~ normal(0.02); Nesterov SGD momentum 0.9, lr 1.0 x batch/512, 5 warmup
  epochs then a per-step cosine measured from step 0 (timm ``warmup_prefix=False``), grad-norm clip 5,
  label smoothing 0.1, 100 epochs.

Two ways to feed it (``mode``):

* ``augment`` -- the faithful protocol: every epoch the training images are augmented (RandomResizedCrop +
  horizontal flip) and pushed through the frozen backbone inside the jitted step. Augmentation is done on the
  device from the eval batches (``random_resized_crop_flip``), or by a caller-supplied training pipeline.
* ``cached`` -- the features of the centre-crop training images are extracted once and the classifier is
  trained on them: far cheaper and what makes learning-rate sweeps affordable, but it
  is not the papers' protocol (no augmentation, no stochastic depth) and usually lands somewhat lower.

Learning-rate sweeps cost little in both modes: the classifier parameters, optimizer state and learning rate
carry a leading ``[num_lrs]`` axis and the update is ``vmap``-ed, so one pass over the data (and one backbone
forward per batch) trains every learning rate. Reported: per-lr final/best top-1, and the best of the sweep.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from swin_ssl.evaluators import common
from swin_ssl.train.parallel import make_mesh

PyTree = Any


def protocol_defaults(protocol: str) -> dict:
    """Hyper-parameters of a protocol (the config presets start from these)."""
    if protocol in ("esvit", "dino"):
        return dict(protocol="esvit", network="target", feature="last_blocks", n_last_blocks=4, backbone_train=False,
                    epochs=100, batch_size=1024, base_lr=1e-3, lr_batch_base=256, momentum=0.9, nesterov=False,
                    weight_decay=0.0, warmup_epochs=0.0, schedule_unit="epoch", min_lr_ratio=0.0,
                    label_smoothing=0.0, grad_clip=0.0, head_init_std=0.01, report="best")
    if protocol == "moby":
        return dict(protocol="moby", network="online", feature="pooled", n_last_blocks=4, backbone_train=True,
                    epochs=100, batch_size=512, base_lr=1.0, lr_batch_base=512, momentum=0.9, nesterov=True,
                    weight_decay=0.0, warmup_epochs=5.0, schedule_unit="step", min_lr_ratio=5e-6,
                    label_smoothing=0.1, grad_clip=5.0, head_init_std=0.02, report="best")
    raise ValueError(f"unknown linear protocol {protocol!r}; known: esvit (= dino), moby")


def lr_shape(step: jax.Array, *, steps_per_epoch: int, epochs: float, warmup_epochs: float = 0.0,
             schedule_unit: str = "epoch", min_lr_ratio: float = 0.0) -> jax.Array:
    """Learning-rate multiplier in [0, 1] at ``step`` (the actual lr is ``lr x lr_shape``).

    ``schedule_unit="epoch"``: ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once per epoch (EsViT/DINO).
    ``"step"``: linear warmup over ``warmup_epochs`` then cosine per step from step 0 to ``min_lr_ratio`` (timm's
    ``CosineLRScheduler(warmup_prefix=False)`` as MoBY's linear evaluation uses it).
    """
    step = jnp.asarray(step, jnp.float32)
    if schedule_unit == "epoch":
        t = jnp.floor(step / steps_per_epoch) / epochs
    elif schedule_unit == "step":
        t = step / max(steps_per_epoch * epochs, 1)
    else:
        raise ValueError(f"schedule_unit must be 'epoch' or 'step', got {schedule_unit!r}")
    cosine = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(t, 1.0)))
    warmup_steps = warmup_epochs * steps_per_epoch
    if warmup_steps > 0:
        return jnp.where(step < warmup_steps, step / warmup_steps, cosine)
    return cosine


def make_optimizer(cfg: Mapping[str, Any], steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum (optionally Nesterov), clip and weight decay, scaled by ``-lr_shape``; the caller
    multiplies the update by its learning rate, which lets one optimizer serve a vmapped lr sweep."""
    parts = []
    if cfg.get("grad_clip", 0.0):
        parts.append(optax.clip_by_global_norm(cfg["grad_clip"]))
    if cfg.get("weight_decay", 0.0):
        parts.append(optax.add_decayed_weights(cfg["weight_decay"]))  # coupled, as torch.optim.SGD
    parts.append(optax.trace(decay=cfg.get("momentum", 0.9), nesterov=cfg.get("nesterov", False)))
    shape_kwargs = dict(steps_per_epoch=steps_per_epoch, epochs=cfg["epochs"],
                        warmup_epochs=cfg.get("warmup_epochs", 0.0),
                        schedule_unit=cfg.get("schedule_unit", "epoch"), min_lr_ratio=cfg.get("min_lr_ratio", 0.0))
    parts.append(optax.scale_by_schedule(lambda count: -lr_shape(count, **shape_kwargs)))
    return optax.chain(*parts)


def init_head(rng: jax.Array, dim: int, num_classes: int, std: float) -> dict:
    """Linear classifier: weight normal(0, std), bias 0 (no BatchNorm in front, as both protocols)."""
    return {"kernel": std * jax.random.normal(rng, (dim, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}


def head_logits(head: dict, x: jax.Array) -> jax.Array:
    return jnp.dot(x, head["kernel"], precision=jax.lax.Precision.HIGHEST) + head["bias"]


def masked_loss(head: dict, x: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int,
                label_smoothing: float) -> jax.Array:
    """Mean (label-smoothed) cross-entropy over the real rows of a padded batch."""
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)  # (1-a) onehot + a/C: timm LabelSmoothingCE
    losses = optax.softmax_cross_entropy(head_logits(head, x), targets)
    mask = mask.astype(jnp.float32)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def random_resized_crop_flip(images: jax.Array, rng: jax.Array, scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> jax.Array:
    """On-device RandomResizedCrop (area fraction ``scale``, log-uniform aspect ``ratio``) + horizontal flip.

    Crops are taken from the given (centre-cropped) image and resized back to its size with bilinear
    interpolation. On ImageNet the official pipeline crops from the full decoded image instead; feed the
    linear probe from an augmenting ``swin_ssl.data`` pipeline there for strict fidelity.
    """
    b, h, w, c = images.shape
    k_area, k_ratio, k_x, k_y, k_flip = jax.random.split(rng, 5)
    area = jax.random.uniform(k_area, (b,), minval=scale[0], maxval=scale[1])
    log_r = jax.random.uniform(k_ratio, (b,), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
    aspect = jnp.exp(log_r)
    cw = jnp.clip(jnp.sqrt(area * aspect) * w, 1.0, w)      # crop size in pixels (clamped: torchvision's fallback)
    ch = jnp.clip(jnp.sqrt(area / aspect) * h, 1.0, h)
    x0 = jax.random.uniform(k_x, (b,)) * (w - cw)
    y0 = jax.random.uniform(k_y, (b,)) * (h - ch)

    def one(img, sy, sx, ty, tx):
        return jax.image.scale_and_translate(img, (h, w, c), (0, 1), jnp.stack([sy, sx]), jnp.stack([ty, tx]),
                                             method="linear", antialias=True)

    sy, sx = h / ch, w / cw
    out = jax.vmap(one)(images, sy, sx, -y0 * sy, -x0 * sx)
    flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    return jnp.where(flip[:, None, None, None], out[:, :, ::-1], out)


class LinearProbe:
    """Trains ``len(lrs)`` linear classifiers at once (vmapped) on features given per batch.

    ``features_fn(backbone_params, batch, rng) -> [B, D]`` is traced into the update (cached mode: the batch
    already holds the features; augment mode: augmentation + frozen backbone forward).
    """

    def __init__(self, cfg: Mapping[str, Any], dim: int, num_classes: int, steps_per_epoch: int,
                 lrs: Sequence[float], mesh: Mesh, seed: int = 0):
        self.cfg, self.num_classes, self.mesh = dict(cfg), int(num_classes), mesh
        self.lrs = jnp.asarray(lrs, jnp.float32)
        self.tx = make_optimizer(self.cfg, steps_per_epoch)
        # Every lr starts from the same head, so a sweep reproduces separate single-lr runs.
        head = init_head(jax.random.PRNGKey(seed), dim, num_classes, self.cfg["head_init_std"])
        self.heads = jax.tree.map(lambda a: jnp.stack([a] * len(lrs)), head)
        self.opt_state = jax.vmap(self.tx.init)(self.heads)
        self._predict = jax.jit(jax.vmap(head_logits, in_axes=(0, None)))

    def make_update(self, features_fn: Callable[..., jax.Array]) -> Callable:
        """``(heads, opt_state, backbone_params, batch, rng) -> (heads, opt_state, losses [num_lrs])``, unjitted."""
        smoothing, num_classes, tx, lrs = self.cfg.get("label_smoothing", 0.0), self.num_classes, self.tx, self.lrs

        def update(heads, opt_state, backbone_params, batch, rng):
            x = jax.lax.stop_gradient(features_fn(backbone_params, batch, rng))

            def one_lr(head, state, lr):
                loss, grads = jax.value_and_grad(masked_loss)(head, x, batch["label"], batch["mask"], num_classes,
                                                              smoothing)
                updates, state = tx.update(grads, state, head)
                updates = jax.tree.map(lambda u: lr * u, updates)
                return optax.apply_updates(head, updates), state, loss

            return jax.vmap(one_lr)(heads, opt_state, lrs)

        return update

    def evaluate(self, test_x: np.ndarray, test_y: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """Top-1 and top-5 accuracy (%) per lr: array [num_lrs, 2]."""
        correct = np.zeros((len(self.lrs), 2))
        k5 = min(5, self.num_classes)
        for start in range(0, len(test_y), chunk):
            logits = np.asarray(self._predict(self.heads, jnp.asarray(test_x[start:start + chunk])))
            top = np.argsort(-logits, axis=-1, kind="stable")[..., :k5]
            y = test_y[start:start + chunk]
            correct[:, 0] += (top[..., 0] == y).sum(-1)
            correct[:, 1] += (top == y[:, None]).any(-1).sum(-1)
        return 100.0 * correct / max(len(test_y), 1)


def _summarize(history: list[np.ndarray], lrs: Sequence[float], report: str, prefix: str) -> dict[str, float]:
    """Per-lr final / best top-1 and the sweep's headline number (best over lrs of the chosen statistic)."""
    acc = np.stack(history)                           # [evals, num_lrs, 2]
    metrics: dict[str, float] = {}
    best_over_epochs = acc[:, :, 0].max(0)
    final = acc[-1]
    for i, lr in enumerate(lrs):
        tag = f"lr{lr:g}"
        metrics[f"{prefix}{tag}/top1"] = float(final[i, 0])
        metrics[f"{prefix}{tag}/top5"] = float(final[i, 1])
        metrics[f"{prefix}{tag}/best_top1"] = float(best_over_epochs[i])
    score = best_over_epochs if report == "best" else final[:, 0]
    i_best = int(np.argmax(score))
    metrics[f"{prefix}top1"] = float(score[i_best])
    metrics[f"{prefix}final_top1"] = float(final[i_best, 0])
    metrics[f"{prefix}final_top5"] = float(final[i_best, 1])
    metrics[f"{prefix}best_lr"] = float(lrs[i_best])
    return metrics


def _scaled_lrs(cfg: Mapping[str, Any], lrs: Sequence[float] | None) -> list[float]:
    """Absolute learning rates: the sweep's base lrs (default: the protocol's) x batch / lr_batch_base."""
    base = list(lrs) if lrs else [cfg["base_lr"]]
    return [float(b) * cfg["batch_size"] / cfg["lr_batch_base"] for b in base]


def train_on_features(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                      cfg: Mapping[str, Any], *, num_classes: int, lrs: Sequence[float] | None = None,
                      mesh: Mesh | None = None, seed: int = 0, eval_every_epochs: int = 1,
                      max_chunk_bytes: int = 1 << 30, prefix: str = "linear/") -> dict[str, float]:
    """Cached-features linear probe: ``lrs`` are base lrs (per ``lr_batch_base`` examples), swept in one pass.

    Each epoch visits every training example once in a fresh random order; the last batch is padded and
    masked. The epoch is moved to the devices in chunks of at most ``max_chunk_bytes`` and scanned.
    """
    mesh = mesh if mesh is not None else make_mesh()
    n_dev = mesh.devices.size
    bs = int(cfg["batch_size"])
    if bs % n_dev:
        raise ValueError(f"linear batch_size {bs} must be a multiple of the {n_dev} devices")
    train_x = np.asarray(train_x, np.float32)
    train_y = np.asarray(train_y, np.int32)
    steps_per_epoch = math.ceil(len(train_y) / bs)
    abs_lrs = _scaled_lrs(cfg, lrs)
    probe = LinearProbe(cfg, train_x.shape[1], num_classes, steps_per_epoch, abs_lrs, mesh, seed)
    chunk_steps = max(1, min(steps_per_epoch, max_chunk_bytes // max(bs * train_x.shape[1] * 4, 1)))
    update = probe.make_update(lambda _, batch, __: batch["x"])
    repl = common.replicated(mesh)

    def scan_chunk(heads, opt_state, xs, ys, ms):
        def body(carry, batch):
            h, o = carry
            h, o, loss = update(h, o, None, {"x": batch[0], "label": batch[1], "mask": batch[2]}, None)
            return (h, o), loss
        (heads, opt_state), losses = jax.lax.scan(body, (heads, opt_state), (xs, ys, ms))
        return heads, opt_state, losses.mean(0)

    chunk_sharding = NamedSharding(mesh, P(None, "data"))
    scan_jit = jax.jit(scan_chunk, in_shardings=(repl, repl, chunk_sharding, chunk_sharding, chunk_sharding),
                       out_shardings=(repl, repl, repl), donate_argnums=(0, 1))
    rng = np.random.default_rng(seed)
    history, t0 = [], time.perf_counter()
    padded = steps_per_epoch * bs
    for epoch in range(int(cfg["epochs"])):
        order = common.pad_rows(rng.permutation(len(train_y)), bs, -1)
        mask = order >= 0
        order = np.where(mask, order, 0)
        for s0 in range(0, steps_per_epoch, chunk_steps):
            s1 = min(s0 + chunk_steps, steps_per_epoch)
            idx = order[s0 * bs:s1 * bs]
            xs = train_x[idx].reshape(s1 - s0, bs, -1)
            ys = train_y[idx].reshape(s1 - s0, bs)
            ms = mask[s0 * bs:s1 * bs].reshape(s1 - s0, bs)
            chunk = [common.put_global(a, chunk_sharding) for a in (xs, ys, ms)]
            probe.heads, probe.opt_state, loss = scan_jit(probe.heads, probe.opt_state, *chunk)
        assert padded == len(order)
        if (epoch + 1) % eval_every_epochs == 0 or epoch + 1 == int(cfg["epochs"]):
            history.append(probe.evaluate(test_x, test_y))
            logging.info("linear (cached) epoch %d: loss %s top1 %s", epoch + 1, np.round(np.asarray(loss), 4),
                         np.round(history[-1][:, 0], 2))
    metrics = _summarize(history, [l for l in (lrs or [cfg["base_lr"]])], cfg.get("report", "best"), prefix)
    metrics[f"{prefix}train_seconds"] = time.perf_counter() - t0
    return metrics


def train_augmented(feature_fn: Callable[..., jax.Array], backbone_params: PyTree,
                    train_batches: Callable[[int], Iterable[Mapping[str, Any]]], test_x: np.ndarray,
                    test_y: np.ndarray, cfg: Mapping[str, Any], *, num_classes: int, num_train: int,
                    lrs: Sequence[float] | None = None, mesh: Mesh | None = None, seed: int = 0,
                    augment_on_device: bool = True, eval_every_epochs: int = 1,
                    prefix: str = "linear/") -> dict[str, float]:
    """The faithful protocol: augmented training images through the frozen backbone every epoch.

    ``train_batches(epoch)`` yields this host's padded batches ``{"image", "label", "mask"}`` of the training set
    (``batch_size / process_count`` rows; centre crops when ``augment_on_device``; already augmented otherwise). ``feature_fn(params, images, rng)`` comes
    from ``common.make_feature_fn`` (``train=True`` for MoBY: stochastic depth stays on). ``test_x`` are the
    frozen test features (centre crop, backbone in eval mode), extracted once by the caller.
    """
    mesh = mesh if mesh is not None else make_mesh()
    bs = int(cfg["batch_size"])
    steps_per_epoch = math.ceil(num_train / bs)
    abs_lrs = _scaled_lrs(cfg, lrs)
    dim = int(np.asarray(test_x).shape[1])
    probe = LinearProbe(cfg, dim, num_classes, steps_per_epoch, abs_lrs, mesh, seed)
    crop_scale = tuple(cfg.get("crop_scale", (0.08, 1.0)))

    def features(params, batch, rng):
        aug_rng, drop_rng = jax.random.split(rng)
        images = batch["image"]
        if augment_on_device:
            images = random_resized_crop_flip(images, aug_rng, crop_scale)
        return feature_fn(params, images, drop_rng)

    repl, data = common.replicated(mesh), NamedSharding(mesh, P("data"))
    step_fn = jax.jit(probe.make_update(features), in_shardings=(repl, repl, repl, data, repl),
                      out_shardings=(repl, repl, repl), donate_argnums=(0, 1))
    key = jax.random.PRNGKey(seed + 1)
    history, t0, step = [], time.perf_counter(), 0
    for epoch in range(int(cfg["epochs"])):
        losses = []
        for batch in train_batches(epoch):
            local = bs // jax.process_count()
            if np.asarray(batch["image"]).shape[0] != local:
                raise ValueError(f"train batch of {np.asarray(batch['image']).shape[0]} rows, expected {local}")
            host = {"image": np.asarray(batch["image"], np.float32), "label": np.asarray(batch["label"], np.int32),
                    "mask": np.asarray(batch.get("mask", np.ones(local, bool)), bool)}
            b = {k: jax.make_array_from_process_local_data(data, v) for k, v in host.items()}
            probe.heads, probe.opt_state, loss = step_fn(probe.heads, probe.opt_state, backbone_params, b,
                                                         jax.random.fold_in(key, step))
            losses.append(loss)
            step += 1
        if (epoch + 1) % eval_every_epochs == 0 or epoch + 1 == int(cfg["epochs"]):
            history.append(probe.evaluate(test_x, test_y))
            logging.info("linear (augment) epoch %d: loss %s top1 %s", epoch + 1,
                         np.round(np.mean(np.asarray(losses), 0), 4) if losses else None, np.round(history[-1][:, 0], 2))
    metrics = _summarize(history, [l for l in (lrs or [cfg["base_lr"]])], cfg.get("report", "best"), prefix)
    metrics[f"{prefix}train_seconds"] = time.perf_counter() - t0
    return metrics
