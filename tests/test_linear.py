"""Linear probe: learns a separable problem, optimizer/schedule/loss match hand-written PyTorch semantics."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swin_ssl.evaluators import common, linear
from swin_ssl.train.parallel import make_mesh


def separable(n, rng, dim=16, classes=4, spread=0.3):
    centres = 3.0 * np.eye(classes, dim)
    y = rng.integers(0, classes, n)
    return (centres[y] + spread * rng.normal(size=(n, dim))).astype(np.float32), y.astype(np.int32)


@pytest.mark.parametrize("protocol", ["esvit", "moby"])
def test_learns_separable_problem(protocol):
    rng = np.random.default_rng(0)
    x, y = separable(600, rng)
    xt, yt = separable(203, rng)
    cfg = linear.protocol_defaults(protocol)
    cfg.update(epochs=10, batch_size=64)
    # esvit's 1e-3/256 is tuned for ImageNet-size runs; sweep it up as one would on a small problem.
    lrs = [cfg["base_lr"], cfg["base_lr"] * 100] if protocol == "esvit" else None
    metrics = linear.train_on_features(x, y, xt, yt, cfg, num_classes=4, lrs=lrs)
    assert metrics["linear/top1"] >= 99.0
    assert metrics["linear/final_top5"] == 100.0


def test_lr_schedules_match_reference_formulas():
    spe, epochs = 10, 4
    esvit = lambda s: float(linear.lr_shape(s, steps_per_epoch=spe, epochs=epochs, schedule_unit="epoch"))  # noqa
    # torch CosineAnnealingLR(T_max=4, eta_min=0) stepped per epoch: lr_e = 0.5 (1 + cos(pi e / 4)).
    for step, epoch in [(0, 0), (9, 0), (10, 1), (25, 2), (39, 3)]:
        assert esvit(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * epoch / epochs)), abs=1e-6)
    moby = lambda s: float(linear.lr_shape(s, steps_per_epoch=spe, epochs=epochs, warmup_epochs=1,  # noqa
                                           schedule_unit="step", min_lr_ratio=0.01))
    assert moby(0) == 0.0 and moby(5) == pytest.approx(0.5)
    # after warmup: cosine measured from step 0 over all 40 steps (timm warmup_prefix=False)
    for step in (10, 20, 33):
        assert moby(step) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / 40)), abs=1e-6)


def test_moby_step_matches_torch_semantics():
    """Two steps of: label-smoothed CE, global-norm clip 5, Nesterov SGD (torch: buf = m buf + g; d = g + m buf),
    computed by hand in NumPy."""
    rng = np.random.default_rng(1)
    dim, classes, bs = 5, 3, 8
    cfg = linear.protocol_defaults("moby")
    cfg.update(epochs=1, warmup_epochs=0.0, schedule_unit="epoch", grad_clip=0.05)  # constant lr, clip active
    lr = 0.7
    probe = linear.LinearProbe(cfg, dim, classes, steps_per_epoch=100, lrs=[lr], mesh=make_mesh())
    update = jax.jit(probe.make_update(lambda _, batch, __: batch["x"]))
    w = np.asarray(probe.heads["kernel"][0], np.float64)
    b = np.asarray(probe.heads["bias"][0], np.float64)
    buf_w, buf_b = np.zeros_like(w), np.zeros_like(b)
    heads, opt = probe.heads, probe.opt_state
    for _ in range(2):
        x = rng.normal(size=(bs, dim)).astype(np.float32)
        y = rng.integers(0, classes, bs).astype(np.int32)
        mask = np.array([True] * 6 + [False] * 2)
        heads, opt, _ = update(heads, opt, None, {"x": x, "label": y, "mask": mask}, None)
        # NumPy reference on the 6 real rows
        xr, yr = x[:6].astype(np.float64), y[:6]
        logits = xr @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        target = 0.9 * np.eye(classes)[yr] + 0.1 / classes
        g_logits = (p - target) / 6
        gw, gb = xr.T @ g_logits, g_logits.sum(0)
        norm = np.sqrt((gw ** 2).sum() + (gb ** 2).sum())
        scale = min(1.0, 0.05 / norm)
        gw, gb = gw * scale, gb * scale
        buf_w, buf_b = 0.9 * buf_w + gw, 0.9 * buf_b + gb
        w = w - lr * (gw + 0.9 * buf_w)
        b = b - lr * (gb + 0.9 * buf_b)
        np.testing.assert_allclose(np.asarray(heads["kernel"][0]), w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(heads["bias"][0]), b, rtol=1e-5, atol=1e-6)


def test_lr_sweep_equals_separate_runs():
    rng = np.random.default_rng(2)
    x, y = separable(100, rng, spread=2.0)
    xt, yt = separable(50, rng, spread=2.0)
    cfg = linear.protocol_defaults("esvit")
    cfg.update(epochs=3, batch_size=32)
    swept = linear.train_on_features(x, y, xt, yt, cfg, num_classes=4, lrs=[0.001, 0.3])
    assert swept["linear/lr0.001/top1"] != swept["linear/lr0.3/top1"]  # the lrs really differ
    for lr in (0.001, 0.3):
        single = linear.train_on_features(x, y, xt, yt, cfg, num_classes=4, lrs=[lr])
        for stat in ("top1", "top5", "best_top1"):
            assert single[f"linear/lr{lr:g}/{stat}"] == swept[f"linear/lr{lr:g}/{stat}"], (lr, stat)


def test_head_init_and_no_batchnorm():
    head = linear.init_head(jax.random.PRNGKey(0), 2304, 1000, 0.01)
    assert set(head) == {"kernel", "bias"} and head["kernel"].shape == (2304, 1000)
    assert float(jnp.std(head["kernel"])) == pytest.approx(0.01, rel=0.02)
    assert float(jnp.abs(head["bias"]).max()) == 0.0


def test_random_resized_crop_identity_and_flip():
    images = jnp.asarray(np.random.default_rng(3).normal(size=(6, 8, 8, 3)), jnp.float32)
    out = linear.random_resized_crop_flip(images, jax.random.PRNGKey(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for a, o in zip(np.asarray(images), np.asarray(out)):
        assert np.allclose(o, a, atol=1e-5) or np.allclose(o, a[:, ::-1], atol=1e-5)
    flipped = [np.allclose(o, a[:, ::-1], atol=1e-5) and not np.allclose(o, a, atol=1e-5)
               for a, o in zip(np.asarray(images), np.asarray(out))]
    assert any(flipped) and not all(flipped)


def test_random_resized_crop_box_within_scale_and_ratio():
    """On ramp images (channel 0 = x, channel 1 = y) a bilinear crop-and-resize is again a ramp whose slope is the
    crop size over the image size (negative when flipped): the recovered boxes obey the area and aspect bounds."""
    n, size = 16, 32
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij")
    ramp = np.stack([xx, yy, np.zeros_like(xx)], -1)
    crops = np.asarray(linear.random_resized_crop_flip(jnp.asarray(np.repeat(ramp[None], n, 0)),
                                                       jax.random.PRNGKey(1), scale=(0.1, 0.3)))
    assert crops.shape == (n, size, size, 3)
    inner = slice(8, 24)  # away from the borders, where the kernel is clipped
    slope_x = np.median(np.diff(crops[:, inner, inner, 0], axis=2), axis=(1, 2))
    slope_y = np.median(np.diff(crops[:, inner, inner, 1], axis=1), axis=(1, 2))
    assert (slope_y > 0).all() and (slope_x > 0).any() and (slope_x < 0).any()  # vertical never, horizontal some
    width, height = np.abs(slope_x) * size, slope_y * size
    area = width * height / size ** 2
    assert ((area > 0.1 - 0.01) & (area < 0.3 + 0.01)).all(), area
    assert ((width / height > 3 / 4 - 0.02) & (width / height < 4 / 3 + 0.02)).all(), width / height
    assert area.max() - area.min() > 0.05  # sampled, not fixed


@pytest.mark.slow
def test_augmented_probe_on_swin_runs_backbone_in_train_mode():
    """The faithful (augmenting) path: swin_test with stochastic depth active (MoBY), two lrs, padded batches.

    Train-mode features depend on the dropout rng (drop path on) while eval-mode ones do not; the probe feeds
    every step an rng; and on images whose class is a colour offset it learns well above chance."""
    from swin_ssl.models import create_model

    rng = np.random.default_rng(4)
    model = create_model("swin_test", drop_path_rate=0.2)

    def images(labels):  # class c: channel c raised by 2 over noise, visible in any crop
        x = 0.3 * rng.normal(size=(len(labels), 32, 32, 3))
        x[np.arange(len(labels)), :, :, labels] += 2.0
        return x.astype(np.float32)

    y, test_y = rng.integers(0, 3, 40).astype(np.int32), rng.integers(0, 3, 30).astype(np.int32)
    x = images(y)
    params = jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, x[:1])["params"]
    train_fn = common.make_feature_fn(model, "pooled", train=True)
    eval_fn = common.make_feature_fn(model, "pooled")
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    assert not np.allclose(train_fn(params, x[:4], k1), train_fn(params, x[:4], k2))
    np.testing.assert_array_equal(train_fn(params, x[:4], k1), train_fn(params, x[:4], k1))
    np.testing.assert_array_equal(eval_fn(params, x[:4], k1), eval_fn(params, x[:4], k2))

    rngs_seen = []

    def spy(p, imgs, drop_rng):
        rngs_seen.append(drop_rng)
        return train_fn(p, imgs, drop_rng)

    test_x = np.asarray(eval_fn(params, images(test_y)))
    cfg = linear.protocol_defaults("moby")
    cfg.update(epochs=8, batch_size=16, warmup_epochs=1.0)
    metrics = linear.train_augmented(spy, params, lambda e: common.padded_batches({"image": x, "label": y}, 16),
                                     test_x, test_y, cfg, num_classes=3, num_train=40, lrs=[16.0, 1.0])
    assert rngs_seen and all(r is not None for r in rngs_seen)
    assert {"linear/lr16/top1", "linear/lr1/top1", "linear/top1"} <= set(metrics)
    assert metrics["linear/top1"] >= 80.0, metrics  # chance: ~33 %