"""The EsViT / DINO objective end to end on tiny models: multi-crop forward, loss glue, centers, EMA, chunking.

References are computed independently: the backbone is called the official way (one call per resolution group
on the *concatenated* crops), the heads applied directly, and the loss re-derived with the NumPy loops of
``test_dino_losses.py``.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dino_vit_small, esvit_swin_tiny  # noqa: E402
from swin_ssl.objectives import dino, multicrop  # noqa: E402
from swin_ssl.train.state import TrainState  # noqa: E402
from swin_ssl.train.validate import Durations  # noqa: E402
from test_dino_losses import np_region_loss, np_view_loss  # noqa: E402

B = 2
# Tiny programs run in milliseconds; XLA's CPU backend optimisations only cost compile time (about half of it).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compile_fast(jitted, *args):
    """``jitted.lower(*args).compile()`` with the backend optimisations off (same numerics, ~2x faster compile)."""
    return jitted.lower(*args).compile(compiler_options=FAST_COMPILE)


def tiny_config(module=esvit_swin_tiny, chunk=3, drop_path=0.0):
    c = module.get_config("smoke")
    c.model.drop_path_rate = drop_path
    c.batch_size = B
    c.dino.region_chunk_size = chunk
    return c


def durations(total_steps=100, steps_per_epoch=3):
    return Durations(steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup_steps=0, freeze_steps=0)


def make_batch(seed, num_local=2, global_size=32, local_size=16, batch=B):
    rng = np.random.default_rng(seed)
    out = {f"global{i}": rng.normal(size=(batch, global_size, global_size, 3)) for i in range(2)}
    out.update({f"local{i}": rng.normal(size=(batch, local_size, local_size, 3)) for i in range(num_local)})
    return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


def make_state(objective, seed=0, random_centers=True):
    key = jax.random.PRNGKey(seed)
    parts = compile_fast(jax.jit(objective.init), key)(key)
    obj_state = parts["obj_state"]
    if random_centers:  # a non-zero previous center makes "the loss uses the previous center" observable
        keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(obj_state))
        obj_state = {k: 0.3 * jax.random.normal(r, v.shape) for (k, v), r in zip(sorted(obj_state.items()), keys)}
    # A teacher that differs from the student (as after some EMA steps), so mixing them up would show.
    target = jax.tree.map(lambda p: p * 1.01 + 0.003, parts["target_params"])
    return TrainState(step=jnp.asarray(40, jnp.int32), params=parts["params"], opt_state=(), target_params=target,
                      batch_stats=parts["batch_stats"], obj_state=obj_state, rng=jax.random.PRNGKey(7))


@functools.lru_cache(maxsize=None)
def esvit_setup():
    """One EsViT objective/state/compiled loss+grad shared by the tests of this file (compiles are the cost)."""
    config = tiny_config(chunk=3)  # 10 student tokens per image -> 4 chunks, the last one padded
    objective = dino.make_objective(config, durations=durations())
    state = make_state(objective)
    fn = jax.jit(jax.value_and_grad(lambda p, s, b: objective.loss(p, s, b, None), has_aux=True))
    return config, objective, state, compile_fast(fn, state.params, state, make_batch(0))


# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_multicrop_forward_equals_one_call_per_group_on_the_concatenation():
    config, _, state, _ = esvit_setup()
    student, _, _ = dino.build_networks(config)
    batch = make_batch(0, num_local=3)
    variables = {"params": state.params["backbone"]}
    names = multicrop.crop_names(batch)
    crops = [batch[n] for n in names]
    apply = lambda x, r: student.apply(variables, x, train=False)
    traced = {}

    def forward_all(cs):
        pooled, tokens, traced["counts"] = multicrop.multicrop_forward(apply, cs, None)
        return pooled, tokens

    pooled, tokens = compile_fast(jax.jit(forward_all), crops)(crops)
    counts = traced["counts"]
    assert counts == (16, 16, 4, 4, 4)  # 32 px -> 4x4 last-stage tokens; 16 px (padding path) -> 2x2
    assert pooled.shape == (5, B, student.num_features) and tokens.shape == (B, 44, student.num_features)
    # Official: concatenate each group on the batch axis, one call, outputs crop-major.
    ref_pooled, ref_tokens = [], []
    forward = jax.jit(lambda x: student.apply(variables, x, train=False)[1])
    for group in (names[:2], names[2:]):
        feats = forward(jnp.concatenate([batch[n] for n in group]))
        ref_pooled.append(feats["pooled"])
        tok = feats["tokens"].reshape(len(group), B, -1, student.num_features)
        ref_tokens += [tok[i] for i in range(len(group))]
    np.testing.assert_allclose(np.asarray(pooled.reshape(5 * B, -1)), np.asarray(jnp.concatenate(ref_pooled)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tokens), np.asarray(jnp.concatenate(ref_tokens, axis=1)),
                               rtol=1e-5, atol=1e-5)


def _reference_loss(config, state, batch):
    """Official-style forward + NumPy loss: (total, view, region, new center, new center_grid)."""
    student, teacher, head = dino.build_networks(config)
    names = multicrop.crop_names(batch)
    p, tp = state.params, state.target_params
    d = student.num_features

    @jax.jit
    def student_group(images):  # one backbone call on the concatenated crops of a group
        _, feats = student.apply({"params": p["backbone"]}, images, train=False)
        tok = feats["tokens"].reshape(images.shape[0], -1, d)
        return head.apply({"params": p["head"]}, feats["pooled"]), head.apply({"params": p["head_dense"]}, tok), tok

    @jax.jit
    def teacher_globals(images):
        _, feats = teacher.apply({"params": tp["backbone"]}, images, train=False)
        tok = feats["tokens"].reshape(images.shape[0], -1, d)
        return head.apply({"params": tp["head"]}, feats["pooled"]), head.apply({"params": tp["head_dense"]}, tok), tok

    f64 = lambda x: np.asarray(x, np.float64)
    s_out, s_region, s_feats = [], [], []
    for group in (names[:2], names[2:]):
        out, reg, tok = map(f64, student_group(jnp.concatenate([batch[n] for n in group])))
        s_out.append(out)
        s_feats += [tok[i * B:(i + 1) * B] for i in range(len(group))]
        s_region += [reg[i * B:(i + 1) * B] for i in range(len(group))]
    t_out, t_reg, ttok = map(f64, teacher_globals(jnp.concatenate([batch["global0"], batch["global1"]])))
    epoch = int(state.step) // 3
    warm = config.dino.warmup_teacher_temp_epochs
    temp = np.concatenate([np.linspace(0.04, config.dino.teacher_temp, warm), [config.dino.teacher_temp] * 100])[epoch]
    center = f64(state.obj_state["center"])
    grid = f64(state.obj_state["center_grid"])
    view, n = np_view_loss(np.concatenate(s_out), t_out, center, temp, 0.1)
    region, n2, _ = np_region_loss(s_region, [t_reg[:B], t_reg[B:]], s_feats, [ttok[:B], ttok[B:]], grid, temp,
                                   0.1, batch=B)
    assert n == n2 == 2 * len(names) - 2
    new_center = 0.9 * center + 0.1 * t_out.mean(0)
    new_grid = 0.9 * grid + 0.1 * t_reg.reshape(-1, t_reg.shape[-1]).mean(0)
    return 0.5 * view + 0.5 * region, view, region, new_center, new_grid


def test_esvit_loss_and_centers_match_the_reference():
    batch = make_batch(1)
    config, _, state, fn = esvit_setup()
    (loss, aux), grads = fn(state.params, state, batch)
    total, view, region, new_center, new_grid = _reference_loss(config, state, batch)
    np.testing.assert_allclose(float(loss), total, rtol=2e-5)
    np.testing.assert_allclose(float(aux["metrics"]["view_loss"]), view, rtol=2e-5)
    np.testing.assert_allclose(float(aux["metrics"]["region_loss"]), region, rtol=2e-5)
    # Centers: EMA of the teacher outputs *after* the loss (which used the previous centers above).
    np.testing.assert_allclose(np.asarray(aux["obj_state"]["center"]), new_center, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["obj_state"]["center_grid"]), new_grid, rtol=1e-5, atol=1e-6)
    assert set(aux["metrics"]) >= {"teacher_entropy", "kl", "region_kl", "region_teacher_entropy", "center_norm",
                                   "center_grid_norm"}
    assert set(grads) == {"backbone", "head", "head_dense"}
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["head_dense"]))  # trained by the region term


@pytest.mark.slow
def test_dino_loss_is_the_view_term_only():
    config = tiny_config(dino_vit_small)
    objective = dino.make_objective(config, durations=durations())
    assert objective.name == "dino"
    state = make_state(objective)
    assert set(state.params) == {"backbone", "head"} and set(state.obj_state) == {"center"}
    batch = make_batch(2)
    loss, aux = jax.jit(lambda p, s, b: objective.loss(p, s, b, None))(state.params, state, batch)
    student, teacher, head = dino.build_networks(config)

    @functools.partial(jax.jit, static_argnums=0)
    def forward(net, p, images):
        _, f = net.apply({"params": p["backbone"]}, images)
        return head.apply({"params": p["head"]}, f["pooled"])

    s_out = [np.asarray(forward(student, state.params, jnp.concatenate([batch[n] for n in group])), np.float64)
             for group in (("global0", "global1"), ("local0", "local1"))]
    t_out = np.asarray(forward(teacher, state.target_params, jnp.concatenate([batch["global0"], batch["global1"]])),
                       np.float64)
    temp = 0.04  # vanilla DINO: no warm-up
    expected, _ = np_view_loss(np.concatenate(s_out), t_out, np.asarray(state.obj_state["center"], np.float64), temp, 0.1)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(aux["obj_state"]["center"]),
                               0.9 * np.asarray(state.obj_state["center"]) + 0.1 * t_out.mean(0), rtol=1e-5, atol=1e-6)


def test_teacher_sees_only_the_global_crops():
    _, _, state, fn = esvit_setup()
    batch = make_batch(3)
    other = dict(batch, local0=batch["local0"] * -2.0 + 1.0)
    ((l1, a1), _), ((l2, a2), _) = fn(state.params, state, batch), fn(state.params, state, other)
    # Teacher-side quantities (centers, teacher entropies) ignore the local crops; the loss does not.
    for k in ("center", "center_grid"):
        np.testing.assert_array_equal(np.asarray(a1["obj_state"][k]), np.asarray(a2["obj_state"][k]))
    assert float(a1["metrics"]["teacher_entropy"]) == float(a2["metrics"]["teacher_entropy"])
    assert float(l1) != float(l2)


def test_ema_after_step_uses_the_step_index_and_covers_heads():
    config = tiny_config()
    objective = dino.make_objective(config, durations=durations(50))
    params = {"backbone": {"w": jnp.ones(3)}, "head": {"last_layer": {"kernel_v": jnp.full((2, 2), 3.0)}}}
    target = {"backbone": {"w": jnp.zeros(3)}, "head": {"last_layer": {"kernel_v": jnp.zeros((2, 2))}}}
    state = TrainState(step=jnp.asarray(10, jnp.int32), params=params, opt_state=(), target_params=target,
                       batch_stats={}, obj_state={}, rng=jax.random.PRNGKey(0))
    new = objective.after_step(state)
    m = 1 - (1 - config.dino.momentum) * (np.cos(np.pi * 10 / 50) + 1) / 2
    np.testing.assert_allclose(np.asarray(new.target_params["backbone"]["w"]), (1 - m) * np.ones(3), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new.target_params["head"]["last_layer"]["kernel_v"]), 3 * (1 - m),
                               rtol=1e-5)
    sched = objective.schedules(jnp.asarray(10))
    np.testing.assert_allclose(float(sched["momentum"]), m, rtol=1e-6)
