"""Optimizer and schedules against NumPy re-derivations (timm/DINO schedule formulas, torch AdamW)."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from swin_ssl.train import optim


def _timm_cosine(t, peak, total, warmup, warmup_init, end):
    """timm CosineLRScheduler(t_initial=total, warmup_t=warmup, warmup_prefix=False), per update."""
    if t < warmup:
        return warmup_init + t * (peak - warmup_init) / warmup
    if t >= total:
        return end
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * t / total))


def moby_loop_lrs(num_updates, peak, total, warmup, warmup_init, end):
    """The lr each update of MoBY's training loop runs with: timm's scheduler starts at its value for t=0
    (``warmup_lr_init`` with a warmup, else the optimizer's lr = peak) and ``step_update(i)`` comes *after*
    ``optimizer.step()`` of update i."""
    current, used = _timm_cosine(0, peak, total, warmup, warmup_init, end), []
    for i in range(num_updates):
        used.append(current)                                                  # optimizer.step()
        current = _timm_cosine(i, peak, total, warmup, warmup_init, end)      # lr_scheduler.step_update(i)
    return np.array(used)


def dino_loop_lrs(peak, total, warmup, warmup_init, end):
    """DINO/EsViT: ``lr_schedule = cosine_scheduler(...)`` and update ``it`` sets ``lr_schedule[it]`` first."""
    ramp = np.linspace(warmup_init, peak, warmup)
    iters = np.arange(total - warmup)
    return np.concatenate([ramp, end + 0.5 * (peak - end) * (1 + np.cos(np.pi * iters / len(iters)))])


@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_lr_of_every_update_matches_the_moby_loop(warmup):
    """Update i runs with timm's value at i - 1 (update 0: the warm-up start), as MoBY's loop steps the scheduler
    after the optimizer. (Before, update i used the value at i: 1.5 % off the loss over a 6-step run.)"""
    peak, total, w0, end = 1e-3, 100, 5e-7, 5e-6
    fn = optim.warmup_cosine(peak, total, warmup, warmup_init=w0, end=end, cosine_from_start=True)
    got = np.array([float(fn(t)) for t in range(total)])
    np.testing.assert_allclose(got, moby_loop_lrs(total, peak, total, warmup, w0, end), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_lr_of_every_update_matches_the_dino_loop(warmup):
    """DINO's warm-up is linspace(start, peak, W): the peak is reached at update W - 1 (before: t / W)."""
    fn = optim.warmup_cosine(5e-4, 100, warmup, warmup_init=0.0, end=1e-6, cosine_from_start=False)
    got = np.array([float(fn(t)) for t in range(100)])
    np.testing.assert_allclose(got, dino_loop_lrs(5e-4, 100, warmup, 0.0, 1e-6), rtol=1e-5, atol=1e-12)


def test_lr_dips_below_peak_after_warmup_only_in_timm_mode():
    timm = optim.warmup_cosine(1.0, 100, 10, cosine_from_start=True)
    dino = optim.warmup_cosine(1.0, 100, 10, cosine_from_start=False)
    assert float(timm(11)) < 0.98  # timm's value at t=10: cos(pi/10) -> 0.9755
    np.testing.assert_allclose(float(dino(9)), 1.0, rtol=1e-6)


def test_weight_decay_cosine_schedule():
    fn = optim.cosine_between(0.04, 0.4, 200)
    for t, expected in [(0, 0.04), (100, 0.22), (200, 0.4), (50, 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi / 4)))]:
        np.testing.assert_allclose(float(fn(t)), expected, rtol=1e-6)


def _params():
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    return {
        "backbone": {
            "patch_embed": {"proj": {"kernel": f(4, 4, 3, 8), "bias": f(8)}, "norm": {"scale": f(8), "bias": f(8)}},
            "attn": {"relative_position_bias_table": f(49, 2), "qkv": {"kernel": f(8, 24), "bias": f(24)}},
        },
        "head": {"mlp_0": {"kernel": f(8, 6), "bias": f(6)}, "last_layer": {"kernel_v": f(6, 5)}},
    }


def test_weight_decay_mask():
    mask = optim.weight_decay_mask(_params())
    flat = {optim.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat == {
        "backbone/patch_embed/proj/kernel": True, "backbone/patch_embed/proj/bias": False,
        "backbone/patch_embed/norm/scale": False, "backbone/patch_embed/norm/bias": False,
        # MoBY decays the relative-position table (no no_weight_decay hook in the MoBY wrapper).
        "backbone/attn/relative_position_bias_table": True,
        "backbone/attn/qkv/kernel": True, "backbone/attn/qkv/bias": False,
        "head/mlp_0/kernel": True, "head/mlp_0/bias": False, "head/last_layer/kernel_v": True,
    }
    excluded = optim.weight_decay_mask(_params(), no_decay_keywords=("relative_position_bias_table",))
    assert not excluded["backbone"]["attn"]["relative_position_bias_table"]


def _optim_config(**kw):
    c = ml_collections.ConfigDict(dict(base_lr=1e-3, warmup_lr=1e-4, min_lr=1e-5, lr_batch_base=512,
                                       cosine_from_start=True, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
                                       weight_decay_end=None, clip_mode="global", clip_norm=5.0,
                                       no_decay_keywords=(), freeze_patterns=()))
    c.update(kw)
    return c


def _torch_adamw(params, grads_seq, lrs, wds, mask, b1=0.9, b2=0.999, eps=1e-8, clip=None, clip_mode="global"):
    """NumPy re-derivation of torch.optim.AdamW (+ clip_grad_norm_ / per-tensor clipping) on flat dicts."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, (g, lr, wd) in enumerate(zip(grads_seq, lrs, wds), start=1):
        g = {k: np.asarray(x, np.float64) for k, x in g.items()}
        if clip is not None and clip_mode == "global":
            total = math.sqrt(sum(np.sum(x ** 2) for x in g.values()))
            g = {k: x * min(1.0, clip / total) for k, x in g.items()}
        elif clip is not None:
            g = {k: x * min(1.0, clip / (np.linalg.norm(x) + 1e-6)) for k, x in g.items()}
        for k in p:
            if mask[k]:
                p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
            mh, vh = m[k] / (1 - b1 ** t), v2[k] / (1 - b2 ** t)
            p[k] = p[k] - lr * mh / (np.sqrt(vh) + eps)
    return p


def _flat(tree):
    return {optim.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("clip_mode", ["global", "per_param"])
def test_adamw_chain_matches_torch_adamw(clip_mode):
    params = _params()
    rng = np.random.default_rng(1)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 3, jnp.float32), params) for _ in range(3)]
    cfg = _optim_config(clip_mode=clip_mode, clip_norm=2.0)
    opt = optim.make_optimizer(cfg, total_steps=10, warmup_steps=2, global_batch=256)
    state = opt.tx.init(params)
    p = params
    for g in grads:
        updates, state = opt.tx.update(g, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    lrs = moby_loop_lrs(3, 1e-3 * 256 / 512, 10, 2, 1e-4 * 256 / 512, 1e-5 * 256 / 512)  # MoBY's loop indexing
    expected = _torch_adamw(_flat(params), [_flat(g) for g in grads], lrs, [0.05] * 3,
                            _flat(optim.weight_decay_mask(params)), clip=2.0, clip_mode=clip_mode)
    got = _flat(p)
    for k in expected:
        np.testing.assert_allclose(np.asarray(got[k]), expected[k], rtol=2e-5, atol=1e-7, err_msg=k)


def test_per_param_clipping_bounds_each_tensor_not_the_total():
    tx = optim.clip_by_per_param_norm(1.0)
    grads = {"big": jnp.full((4,), 3.0), "small": jnp.full((4,), 0.1)}
    out, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(float(jnp.linalg.norm(out["big"])), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["small"]), 0.1, rtol=1e-6)  # untouched
    np.testing.assert_allclose(np.asarray(out["big"]) / np.linalg.norm(out["big"]), 0.5, rtol=1e-5)


def test_freeze_last_layer_masks_updates_including_weight_decay():
    params = _params()
    cfg = _optim_config(freeze_patterns=("last_layer",), weight_decay=0.3)
    opt = optim.make_optimizer(cfg, total_steps=20, warmup_steps=0, global_batch=512, freeze_steps=2)
    state = opt.tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    history = []
    p = params
    for _ in range(3):
        updates, state = opt.tx.update(grads, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
        history.append(p)
    frozen0 = np.asarray(params["head"]["last_layer"]["kernel_v"])
    # Steps 0 and 1: the last layer does not move at all (no Adam step, no decoupled decay).
    np.testing.assert_array_equal(np.asarray(history[0]["head"]["last_layer"]["kernel_v"]), frozen0)
    np.testing.assert_array_equal(np.asarray(history[1]["head"]["last_layer"]["kernel_v"]), frozen0)
    assert not np.allclose(np.asarray(history[2]["head"]["last_layer"]["kernel_v"]), frozen0)
    # Everything else trains from step 0.
    assert not np.allclose(np.asarray(history[0]["head"]["mlp_0"]["kernel"]), np.asarray(params["head"]["mlp_0"]["kernel"]))
    # Only zeroing the gradient would not be enough: decoupled decay alone moves a decayed 2-D param.
    zero_grad = jax.tree.map(jnp.zeros_like, params)
    opt_nofreeze = optim.make_optimizer(cfg, total_steps=20, warmup_steps=0, global_batch=512, freeze_steps=0)
    u, _ = opt_nofreeze.tx.update(zero_grad, opt_nofreeze.tx.init(params), params)
    assert float(jnp.abs(u["head"]["last_layer"]["kernel_v"]).max()) > 0


def test_first_update_after_the_freeze_is_a_fresh_adamw_step():
    """As PyTorch (grad None during the freeze: no moments, no step count), the frozen tensor's first update is
    AdamW's t=1 step at the current lr and weight decay, whatever gradients it saw while frozen."""
    params = _params()
    cfg = _optim_config(freeze_patterns=("last_layer",), weight_decay=0.3, clip_mode="none")
    opt = optim.make_optimizer(cfg, total_steps=20, warmup_steps=0, global_batch=512, freeze_steps=2)
    rng = np.random.default_rng(3)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params) for _ in range(3)]
    state, p = opt.tx.init(params), params
    for g in grads:
        updates, state = opt.tx.update(g, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    key = "head/last_layer/kernel_v"
    lr2 = moby_loop_lrs(3, 1e-3, 20, 0, 1e-4, 1e-5)[2]  # this config is MoBY's: update i uses timm's lr(i - 1)
    want = _torch_adamw({key: _flat(params)[key]}, [{key: _flat(grads[2])[key]}], [lr2], [0.3], {key: True})[key]
    np.testing.assert_allclose(np.asarray(_flat(p)[key]), want, rtol=2e-5, atol=1e-7)
    # The trained tensors took three ordinary AdamW steps meanwhile.
    key = "head/mlp_0/kernel"
    lrs = moby_loop_lrs(3, 1e-3, 20, 0, 1e-4, 1e-5)
    want = _torch_adamw({key: _flat(params)[key]}, [{key: _flat(g)[key]} for g in grads], lrs, [0.3] * 3, {key: True})[key]
    np.testing.assert_allclose(np.asarray(_flat(p)[key]), want, rtol=2e-5, atol=1e-7)


def test_schedules_continue_from_restored_optimizer_counts():
    """optax's internal counts advance with the step, so update k uses lr(k) also after a restore."""
    params = {"w": jnp.ones((2, 2))}
    opt = optim.make_optimizer(_optim_config(weight_decay=0.0), total_steps=10, warmup_steps=3, global_batch=512)
    state = opt.tx.init(params)
    grads = {"w": jnp.ones((2, 2))}
    for _ in range(4):
        _, state = opt.tx.update(grads, state, params)
    restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)  # as a checkpoint round trip would
    u, _ = opt.tx.update(grads, restored, params)
    # Adam's normalised step for a constant gradient is ~1, so the update is -lr(4).
    np.testing.assert_allclose(float(u["w"][0, 0]), -float(opt.lr(4)), rtol=1e-4)


def test_decay_keywords_force_decay_of_dino_scale_g():
    # PyTorch's trainable weight_g is [out, 1] (2-D, decayed by the rank rule); ours is a 1-D scale_g.
    params = {"head": {"last_layer": {"scale_g": jnp.ones(4), "kernel_v": jnp.ones((3, 4))},
                       "mlp_0": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}},
              "norm": {"scale": jnp.ones(4)}}
    default = optim.weight_decay_mask(params)
    forced = optim.weight_decay_mask(params, decay_keywords=("scale_g",))
    assert not default["head"]["last_layer"]["scale_g"] and forced["head"]["last_layer"]["scale_g"]
    for mask in (default, forced):
        assert mask["head"]["last_layer"]["kernel_v"] and mask["head"]["mlp_0"]["kernel"]
        assert not mask["head"]["mlp_0"]["bias"] and not mask["norm"]["scale"]
