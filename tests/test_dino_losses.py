"""DINO / EsViT pure pieces against NumPy re-derivations written from the official losses' description (docs/fidelity.md).

The NumPy versions loop over pairs, samples and tokens the way the official DDINOLoss reads, so they share no
vectorisation (and no code) with ``swin_ssl/objectives/dino.py``.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swin_ssl.models.heads import l2_normalize
from swin_ssl.objectives import dino, multicrop


# ------------------------------------------------------------------------------------------------
# NumPy reference

def np_softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_view_loss(student, teacher, center, tt, ts):
    """student [V*B, K] crop-major, teacher [G*B, K]; official chunk() + double loop."""
    ng = 2
    v_count = student.shape[0] // (teacher.shape[0] // ng)
    s_chunks = np.split(student / ts, v_count)
    t_chunks = np.split(np_softmax((teacher - center) / tt), ng)
    total, n = 0.0, 0
    for iq, q in enumerate(t_chunks):
        for v in range(v_count):
            if v == iq:
                continue
            per_sample = np.sum(-q * np_log_softmax(s_chunks[v]), axis=-1)
            total += per_sample.mean()
            n += 1
    return total / n, n


def np_region_loss(s_region, t_region, s_feats, t_feats, center_grid, tt, ts, batch):
    """s_region / s_feats: list over crops of [B, N_v, *]; t_region / t_feats: list over the 2 globals of [B, Nt, *].

    For each pair (iq, v != iq), sample b, student token i: j* = argmax_j cos(s_feats[v][b,i], t_feats[iq][b,j]);
    CE(softmax((t_region[iq][b,j*] - c)/tt), log_softmax(s_region[v][b,i]/ts)); mean over i, then over b.
    """
    total, total_kl, n = 0.0, 0.0, 0
    for iq in range(len(t_region)):
        tp = np_softmax((t_region[iq] - center_grid) / tt)
        for v in range(len(s_region)):
            if v == iq:
                continue
            per_sample, per_sample_kl = [], []
            for b in range(batch):
                losses, kls = [], []
                for i in range(s_feats[v].shape[1]):
                    sv = s_feats[v][b, i] / np.linalg.norm(s_feats[v][b, i])
                    sims = [sv @ (t_feats[iq][b, j] / np.linalg.norm(t_feats[iq][b, j]))
                            for j in range(t_feats[iq].shape[1])]
                    j = int(np.argmax(sims))
                    logp = np_log_softmax(s_region[v][b, i] / ts)
                    losses.append(-np.sum(tp[b, j] * logp))
                    kls.append(np.sum(tp[b, j] * (np.log(tp[b, j]) - logp)))
                per_sample.append(np.mean(losses))
                per_sample_kl.append(np.mean(kls))
            total += np.mean(per_sample)
            total_kl += np.mean(per_sample_kl)
            n += 1
    return total / n, n, total_kl / n


# ------------------------------------------------------------------------------------------------
# View term

def test_view_loss_matches_numpy_and_skips_same_crop_pairs():
    rng = np.random.default_rng(0)
    V, G, B, K = 10, 2, 3, 7
    student = rng.normal(size=(V * B, K)).astype(np.float32) * 3
    teacher = rng.normal(size=(G * B, K)).astype(np.float32) * 3
    center = rng.normal(size=(K,)).astype(np.float32) * 0.5
    expected, n = np_view_loss(student.astype(np.float64), teacher.astype(np.float64), center, 0.05, 0.1)
    assert n == 18 == dino.num_pairs(V, G)
    got, metrics = dino.view_loss(jnp.asarray(student.reshape(V, B, K)), jnp.asarray(teacher.reshape(G, B, K)),
                                  jnp.asarray(center), jnp.float32(0.05), 0.1)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)

    # The pairs v == iq are skipped: making student crop 0 agree with teacher crop 0 and disagree with
    # teacher crop 1 changes the loss only through the (iq=1, v=0) pair.
    student2 = student.copy()
    student2[:B] = rng.normal(size=(B, K)) * 3
    exp2, _ = np_view_loss(student2.astype(np.float64), teacher.astype(np.float64), center, 0.05, 0.1)
    got2, _ = dino.view_loss(jnp.asarray(student2.reshape(V, B, K)), jnp.asarray(teacher.reshape(G, B, K)),
                             jnp.asarray(center), 0.05, 0.1)
    np.testing.assert_allclose(float(got2), exp2, rtol=1e-5)
    tp = np_softmax((teacher.astype(np.float64) - center) / 0.05)
    pair10 = lambda s: np.mean(np.sum(-tp[B:] * np_log_softmax(s[:B] / 0.1), -1))
    np.testing.assert_allclose(float(got2) - float(got), (pair10(student2) - pair10(student)) / 18, rtol=1e-4)

    # Health metrics: teacher entropy and KL(teacher || student) averaged over pairs.
    h = -np.sum(tp * np.log(tp), -1).mean()
    np.testing.assert_allclose(float(metrics["teacher_entropy"]), h, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), expected - h, rtol=1e-4, atol=1e-6)


def test_view_loss_has_no_gradient_into_the_teacher():
    rng = np.random.default_rng(1)
    s = jnp.asarray(rng.normal(size=(4, 2, 5)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(2, 2, 5)), jnp.float32)
    g = jax.grad(lambda t: dino.view_loss(s, t, jnp.zeros(5), 0.04)[0])(t)
    assert float(jnp.abs(g).max()) == 0.0


# ------------------------------------------------------------------------------------------------
# Region term

def _region_problem(seed, B=2, K=6, D=5, counts=(4, 4, 1, 1, 1)):
    rng = np.random.default_rng(seed)
    G = 2
    s_feats = [rng.normal(size=(B, n, D)) for n in counts]
    t_feats = [rng.normal(size=(B, counts[0], D)) for _ in range(G)]
    s_region = [rng.normal(size=(B, n, K)) * 2 for n in counts]
    t_region = [rng.normal(size=(B, counts[0], K)) * 2 for _ in range(G)]
    center = rng.normal(size=(K,)) * 0.3
    return s_feats, t_feats, s_region, t_region, center


def _flat(parts):
    return jnp.asarray(np.concatenate(parts, axis=1), jnp.float32)


@pytest.mark.parametrize("chunk", [0, 3, 7])
def test_region_loss_matches_numpy(chunk):
    counts = (4, 4, 1, 1, 1)
    s_feats, t_feats, s_region, t_region, center = _region_problem(0, counts=counts)
    expected, n, _ = np_region_loss(s_region, t_region, s_feats, t_feats, center, 0.04, 0.1, batch=2)
    assert n == 2 * len(counts) - 2
    idx = dino.match_regions(_flat(s_feats), _flat(t_feats), num_global=2)
    probs = dino.teacher_probs(_flat(t_region), jnp.asarray(center, jnp.float32), 0.04)
    weights = dino.region_pair_weights(counts, 2)
    if chunk == 0:
        got = dino.region_loss(_flat(s_region), probs, idx, weights, 0.1)
    else:  # chunked through an identity "head": the logits are the given ones
        table = _flat(s_region)
        tokens = jnp.broadcast_to(jnp.arange(table.shape[1], dtype=jnp.float32)[None, :, None], table.shape[:2] + (1,))
        head = lambda tok: jax.vmap(lambda tb, ib: tb[ib[:, 0].astype(jnp.int32)])(table, tok)
        got = dino.region_loss_chunked(head, tokens, probs, idx, weights, 0.1, chunk_size=chunk)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_match_regions_is_an_argmax_of_cosine_not_dot_product():
    # Teacher token 0 has a large norm but points away; token 1 is short and aligned: cosine picks 1.
    s = jnp.asarray([[[1.0, 0.0]]])  # [B=1, T=1, D=2]
    t = jnp.asarray([[[10.0, 8.0], [0.1, 0.0], [0.0, 1.0], [1.0, 0.1]]])  # G=2 crops of 2 tokens
    idx = dino.match_regions(s, t, num_global=2)
    assert idx.shape == (1, 1, 2)
    assert idx.tolist() == [[[1, 3]]]  # crop 0 -> token 1; crop 1 -> token 3 (global index 2 + 1)


def test_region_pair_weights_skip_own_crop_and_average_tokens():
    w = dino.region_pair_weights((4, 4, 1, 1), num_global=2)
    n = 6
    np.testing.assert_allclose(w[:4], [[0, 1 / (4 * n)]] * 4)
    np.testing.assert_allclose(w[4:8], [[1 / (4 * n), 0]] * 4)
    np.testing.assert_allclose(w[8:], [[1 / n, 1 / n]] * 2)
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)  # the weights form a mean over pairs


def test_chunked_region_loss_gradients_match_one_shot():
    rng = np.random.default_rng(3)
    B, T, D, K, counts = 2, 11, 4, 9, (4, 4, 1, 1, 1)
    tokens = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    w_head = (jnp.asarray(rng.normal(size=(D, 5)), jnp.float32), jnp.asarray(rng.normal(size=(5, K)), jnp.float32))
    t_tokens = jnp.asarray(rng.normal(size=(B, 8, D)), jnp.float32)
    probs = dino.teacher_probs(jnp.asarray(rng.normal(size=(B, 8, K)), jnp.float32), jnp.zeros(K), 0.05)
    idx = dino.match_regions(tokens, t_tokens, 2)
    weights = dino.region_pair_weights(counts, 2)

    def loss(w, chunk):
        # L2-normalised like DINOHead: padding the chunks with zero tokens would give NaN gradients here.
        head = lambda x: l2_normalize(jnp.tanh(x @ w[0])) @ w[1]
        return dino.region_loss_chunked(head, tokens, probs, idx, weights, 0.1, chunk)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref_v, ref_g = value_and_grad(w_head, 0)
    for chunk in (2, 4, 5):
        v, g = value_and_grad(w_head, chunk)
        np.testing.assert_allclose(float(v), float(ref_v), rtol=1e-6)
        for a, b in zip(g, ref_g):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_matched_entropy_gives_region_kl():
    counts = (4, 4, 1, 1, 1)
    s_feats, t_feats, s_region, t_region, center = _region_problem(5, counts=counts)
    _, _, expected_kl = np_region_loss(s_region, t_region, s_feats, t_feats, center, 0.04, 0.1, batch=2)
    idx = dino.match_regions(_flat(s_feats), _flat(t_feats), 2)
    probs = dino.teacher_probs(_flat(t_region), jnp.asarray(center, jnp.float32), 0.04)
    weights = dino.region_pair_weights(counts, 2)
    loss = dino.region_loss(_flat(s_region), probs, idx, weights, 0.1)
    kl = loss - dino.matched_entropy(probs, idx, weights)
    np.testing.assert_allclose(float(kl), expected_kl, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Centers

def test_center_update_is_ema_of_the_global_mean_after_the_loss():
    rng = np.random.default_rng(4)
    K = 5
    teacher = rng.normal(size=(2, 3, K))
    c0 = rng.normal(size=K)
    c1 = dino.update_center(jnp.asarray(c0, jnp.float32), jnp.asarray(teacher.reshape(6, K).mean(0), jnp.float32), 0.9)
    np.testing.assert_allclose(np.asarray(c1), 0.9 * c0 + 0.1 * teacher.reshape(6, K).mean(0), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Schedules

def np_teacher_temp_schedule(warmup, final, warmup_epochs, epochs):
    """The official construction: linspace over the warm-up epochs, then constant."""
    return np.concatenate([np.linspace(warmup, final, warmup_epochs), np.ones(epochs - warmup_epochs) * final])


@pytest.mark.parametrize("warmup_epochs", [30, 1, 0])
def test_teacher_temperature_is_indexed_per_epoch(warmup_epochs):
    spe, epochs = 7, 40
    ref = np_teacher_temp_schedule(0.04, 0.07, warmup_epochs, epochs)
    for step in [0, 1, 6, 7, 8, 13, 14, 100, 29 * 7 - 1, 29 * 7, 30 * 7, 39 * 7 + 6]:
        got = float(dino.teacher_temperature(jnp.int32(step), spe, 0.04, 0.07, warmup_epochs))
        np.testing.assert_allclose(got, ref[step // spe], rtol=1e-6, err_msg=f"step {step}")


def test_teacher_momentum_cosine():
    total = 1000
    for step in [0, 1, 250, 500, 999, 1000]:
        ref = 1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * step / total))  # cosine_scheduler(0.996, 1, ...)
        np.testing.assert_allclose(float(dino.teacher_momentum(jnp.int32(step), total, 0.996)), ref, rtol=1e-7)


# ------------------------------------------------------------------------------------------------
# Multi-crop helpers

def test_crop_names_and_grouping():
    batch = {"local1": 0, "global1": 0, "local10": 0, "local0": 0, "global0": 0, "label": 0, "local2": 0}
    names = multicrop.crop_names(batch)
    assert names == ["global0", "global1", "local0", "local1", "local2", "local10"]
    shapes = [(2, 8, 8, 3)] * 2 + [(2, 4, 4, 3)] * 3 + [(2, 8, 8, 3)]
    assert multicrop.group_by_resolution(shapes) == [(0, 2), (2, 5), (5, 6)]
    with pytest.raises(ValueError):
        multicrop.crop_names({"view1": 0})
