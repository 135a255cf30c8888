"""EsViT/DINO optimizer recipe (``configs/esvit_*``, built by ``swin_ssl/train/optim.py``) against the official
schedules re-derived in NumPy: lr and weight-decay schedules, per-parameter clipping at 3.0, and the last layer
frozen (no update, no weight decay) during the first epoch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import dino_vit_small, esvit_swin_tiny  # noqa: E402
from swin_ssl.train import optim  # noqa: E402


def np_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0):
    """DINO's utils.cosine_scheduler: linspace warm-up, then a cosine over the remaining iterations."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


def _recipe_optimizer(config, steps_per_epoch):
    epochs = int(config.total_epochs)
    total = epochs * steps_per_epoch
    return optim.make_optimizer(config.optim, total_steps=total, warmup_steps=int(config.warmup_epochs) * steps_per_epoch,
                                global_batch=config.batch_size, freeze_steps=steps_per_epoch), total


@pytest.mark.parametrize("module", [esvit_swin_tiny, dino_vit_small])
def test_lr_and_weight_decay_schedules_follow_dino(module):
    config = module.get_config(None)
    spe = 2502  # ImageNet-1K at batch 512 (1,281,167 // 512)
    opt, total = _recipe_optimizer(config, spe)
    peak = 5e-4 * config.batch_size / 256
    lr_ref = np_cosine_scheduler(peak, 1e-6, int(config.total_epochs), spe, warmup_epochs=10)
    wd_ref = np_cosine_scheduler(0.04, 0.4, int(config.total_epochs), spe)
    warmup = 10 * spe
    for step in [0, 1, spe, warmup // 2, warmup - 1, warmup, warmup + 1, total // 2, total - 1000, total - 1]:
        np.testing.assert_allclose(float(opt.lr(step)), lr_ref[step], rtol=1e-4, atol=1e-12, err_msg=f"lr at {step}")
    np.testing.assert_allclose(float(opt.lr(0)), 0.0, atol=1e-12)  # warm-up starts at exactly 0
    np.testing.assert_allclose(float(opt.lr(warmup - 1)), peak, rtol=1e-6)  # linspace: the peak at W - 1
    for step in [0, 1, spe, total // 3, total // 2, total - 1]:
        np.testing.assert_allclose(float(opt.weight_decay(step)), wd_ref[step], rtol=1e-4, err_msg=f"wd at {step}")
    np.testing.assert_allclose(float(opt.lr(total - 1)), 1e-6, rtol=0.05)  # ends near DINO's absolute min_lr


def test_batch_override_scales_the_peak_lr_but_not_dinos_min_lr():
    """``--config.batch_size=1024`` (no helper): the peak doubles, the final lr is still DINO's absolute 1e-6."""
    config = esvit_swin_tiny.get_config(None)
    config.batch_size = 1024
    opt, total = _recipe_optimizer(config, 1_281_167 // 1024)
    warmup = 10 * (1_281_167 // 1024)
    np.testing.assert_allclose(float(opt.lr(warmup)), 5e-4 * 1024 / 256, rtol=1e-5)
    np.testing.assert_allclose(float(opt.lr(total)), 1e-6, rtol=1e-4)


def test_per_parameter_clipping_scales_each_tensor_independently():
    config = esvit_swin_tiny.get_config(None)
    assert config.optim.clip_mode == "per_param" and config.optim.clip_norm == 3.0
    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(4, 5)) * 10, "b": rng.normal(size=(3,)) * 0.1, "c": rng.normal(size=(2, 2)) * 2}
    grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads)
    tx = optim.clip_by_per_param_norm(3.0)
    clipped, _ = tx.update(grads, tx.init(grads))
    for k, g in grads.items():
        g = np.asarray(g, np.float64)
        norm = np.linalg.norm(g)
        expected = g * (3.0 / (norm + 1e-6)) if norm > 3.0 else g  # esvit utils.clip_gradients
        np.testing.assert_allclose(np.asarray(clipped[k]), expected, rtol=1e-5, err_msg=k)
    # Not a global-norm clip: the small tensor "b" is untouched although the global norm is far above 3.
    assert float(optax.tree.norm(grads)) > 3.0
    np.testing.assert_array_equal(np.asarray(clipped["b"]), np.asarray(grads["b"]))


def test_last_layer_gets_no_update_and_no_weight_decay_during_the_first_epoch():
    config = esvit_swin_tiny.get_config(None)
    spe = 3
    opt, _ = _recipe_optimizer(config, spe)
    rng = np.random.default_rng(1)
    # The parameter paths of the EsViT objective: heads "head"/"head_dense" with a "last_layer" submodule.
    params = {
        "backbone": {"norm": {"scale": jnp.ones(4)}, "layers_0": {"kernel": jnp.asarray(rng.normal(size=(4, 4)))}},
        "head": {"mlp_0": {"kernel": jnp.asarray(rng.normal(size=(4, 4))), "bias": jnp.ones(4)},
                 "last_layer": {"kernel_v": jnp.asarray(rng.normal(size=(4, 8))), "scale_g": jnp.ones(8)}},
        "head_dense": {"last_layer": {"kernel_v": jnp.asarray(rng.normal(size=(4, 8))), "scale_g": jnp.ones(8)}},
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    is_last = lambda path: "last_layer" in jax.tree_util.keystr(path)
    opt_state = opt.tx.init(params)
    current = params
    for step in range(spe + 2):  # lr(0) = 0; steps 1, 2 frozen with lr > 0; steps 3, 4 free
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), current)
        updates, opt_state = opt.tx.update(grads, opt_state, current)
        new = optax.apply_updates(current, updates)
        moved = jax.tree_util.tree_map_with_path(lambda p, a, b: (is_last(p), bool(jnp.any(a != b))), current, new)
        for last, changed in jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple)):
            if last and step > 0:
                assert changed == (step >= spe), f"step {step}: last_layer changed={changed}"
        if step >= 1:  # lr > 0 after step 0: the other parameters move
            assert bool(jnp.any(new["head"]["mlp_0"]["kernel"] != current["head"]["mlp_0"]["kernel"]))
        current = new


def test_last_layer_frozen_even_with_pure_weight_decay():
    """A step with zero gradients and weight decay > 0 still moves decayed params but not the frozen last layer."""
    config = esvit_swin_tiny.get_config(None)
    opt, _ = _recipe_optimizer(config, 5)
    params = {"head": {"mlp_0": {"kernel": jnp.full((3, 3), 2.0)}, "last_layer": {"kernel_v": jnp.full((3, 3), 2.0)}}}
    state = opt.tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(3):  # lr > 0 from step 1
        updates, state = opt.tx.update(zeros, state, params)
    assert float(jnp.abs(updates["head"]["mlp_0"]["kernel"]).max()) > 0  # decoupled weight decay acts
    assert float(jnp.abs(updates["head"]["last_layer"]["kernel_v"]).max()) == 0.0
    # Expected decoupled decay on the other kernel: -lr * wd * p.
    lr, wd = float(opt.lr(2)), float(opt.weight_decay(2))
    np.testing.assert_allclose(np.asarray(updates["head"]["mlp_0"]["kernel"]), -lr * wd * 2.0, rtol=1e-5)
