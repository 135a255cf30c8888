"""MoBY objective: loss, queues, EMA and momentum against NumPy re-derivations of the reference formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from configs import moby_swin_tiny  # noqa: E402
from swin_ssl.objectives import moby  # noqa: E402
from swin_ssl.train import validate  # noqa: E402
from swin_ssl.train.state import TrainState  # noqa: E402


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_infonce(q, k_pos, queue, t):
    """-log softmax over [q.k_pos, q.queue_j ...] / t at index 0, per sample (torch CrossEntropy, label 0)."""
    out = []
    for i in range(q.shape[0]):
        logits = np.concatenate([[q[i] @ k_pos[i]], queue @ q[i]]) / t
        logits = logits.astype(np.float64)
        out.append(-(logits[0] - np.log(np.sum(np.exp(logits)))))
    return np.array(out)


def test_loss_matches_numpy_and_pairs_queues_by_view():
    rng = np.random.default_rng(0)
    b, k, d, t = 5, 12, 6, 0.2
    p1, p2, k1, k2 = (_unit(rng, b, d) for _ in range(4))
    q1, q2 = _unit(rng, k, d), _unit(rng, k, d)
    loss, metrics = moby.moby_loss(*(jnp.asarray(x, jnp.float32) for x in (p1, p2, k1, k2, q1, q2)), t)
    # Reference: pred_1 against (key of view 2, queue2) + pred_2 against (key of view 1, queue1); SUM of means.
    expected = _np_infonce(p1, k2, q2, t).mean() + _np_infonce(p2, k1, q1, t).mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # Pairing the queues the other way round gives a different number (so the check above can fail).
    swapped = _np_infonce(p1, k2, q1, t).mean() + _np_infonce(p2, k1, q2, t).mean()
    assert abs(swapped - expected) > 1e-3
    np.testing.assert_allclose(float(metrics["pos_logit"]),
                               (np.sum(p1 * k2, 1).mean() + np.sum(p2 * k1, 1).mean()) / 2 / t, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["neg_logit"]), ((p1 @ q2.T).mean() + (p2 @ q1.T).mean()) / 2 / t,
                               rtol=1e-4, atol=1e-6)


def test_loss_is_low_when_prediction_matches_key_and_queue_is_far():
    """Sanity of sign/direction: a perfect positive and orthogonal negatives give ~log(1 + K e^-1/T)."""
    d, k, t = 8, 4, 0.2
    e = np.eye(d, dtype=np.float32)
    p = e[:1]
    queue = e[1:1 + k]
    loss, _ = moby.moby_loss(p, p, p, p, queue, queue, t)
    expected = 2 * math.log(1 + k * math.exp(-1 / t))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_enqueue_wraps_around_and_keeps_views_apart():
    k, d, b = 8, 3, 4
    queues = moby.init_queues(jax.random.PRNGKey(0), k, d)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(queues["queue1"]), axis=1), 1.0, rtol=1e-5)
    assert queues["queue1"].shape == (k, d)
    batches = [(np.full((b, d), 10 * s + 1, np.float32), np.full((b, d), 10 * s + 2, np.float32)) for s in range(3)]
    pointers = []
    for k1, k2 in batches:
        queues = moby.enqueue(queues, jnp.asarray(k1), jnp.asarray(k2))
        pointers.append(int(queues["ptr"]))
    assert pointers == [4, 0, 4]
    q1, q2 = np.asarray(queues["queue1"]), np.asarray(queues["queue2"])
    # Third batch overwrote rows 0..3 (wrap-around), rows 4..7 still hold the second batch.
    np.testing.assert_array_equal(q1[:4], 21.0)
    np.testing.assert_array_equal(q1[4:], 11.0)
    # queue1 only ever receives view-1 keys, queue2 view-2 keys.
    np.testing.assert_array_equal(q2[:4], 22.0)
    np.testing.assert_array_equal(q2[4:], 12.0)


def test_enqueue_under_jit_with_traced_pointer():
    queues = moby.init_queues(jax.random.PRNGKey(1), 6, 2)
    queues = dict(queues, ptr=jnp.asarray(4, jnp.int32))
    out = jax.jit(moby.enqueue)(queues, jnp.ones((2, 2)), 2 * jnp.ones((2, 2)))
    assert int(out["ptr"]) == 0
    np.testing.assert_array_equal(np.asarray(out["queue1"])[4:], 1.0)
    np.testing.assert_array_equal(np.asarray(out["queue1"])[:4], np.asarray(queues["queue1"])[:4])


@pytest.mark.parametrize("step,expected", [(0, 0.99), (500, 0.995), (1000, 1.0), (250, None), (1200, 1.0)])
def test_momentum_schedule(step, expected):
    total = 1000
    if expected is None:  # the official formula at an arbitrary step
        expected = 1 - (1 - 0.99) * (math.cos(math.pi * step / total) + 1) / 2
    np.testing.assert_allclose(float(moby.momentum_schedule(step, total, 0.99)), expected, rtol=0, atol=1e-7)


def _smoke_objective(**overrides):
    config = moby_swin_tiny.get_config("smoke")
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return config, moby.make_objective(config, durations=validate.durations(config))


def test_ema_before_step_uses_pre_step_online_weights_and_skips_predictor():
    config, objective = _smoke_objective(total_steps=100)
    rng = np.random.default_rng(0)
    tree = lambda: {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
    online = {"backbone": tree(), "projector": tree(), "predictor": tree()}
    target = {"backbone": tree(), "projector": tree()}
    step = 37
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=online, opt_state=None, target_params=target,
                       batch_stats={}, obj_state={}, rng=jax.random.PRNGKey(0))
    new = objective.before_step(state)
    m = 1 - (1 - 0.99) * (math.cos(math.pi * step / 100) + 1) / 2
    for part in ("backbone", "projector"):
        for leaf in ("w", "b"):
            np.testing.assert_allclose(np.asarray(new.target_params[part][leaf]),
                                       m * target[part][leaf] + (1 - m) * online[part][leaf], rtol=1e-6)
    assert set(new.target_params) == {"backbone", "projector"}  # predictor is never EMA'd
    np.testing.assert_array_equal(np.asarray(new.params["predictor"]["w"]), online["predictor"]["w"])
    np.testing.assert_allclose(float(objective.schedules(jnp.asarray(step))["momentum"]), m, rtol=1e-6)


@pytest.mark.slow
def test_objective_loss_equals_two_separate_per_view_passes():
    """The vmapped forward must equal the official two calls per branch (BN statistics per view)."""
    config, objective = _smoke_objective(**{"model.drop_path_rate": 0.0})
    online, target, projector, predictor = moby.build_networks(config)
    parts = jax.jit(objective.init)(jax.random.PRNGKey(0))
    # Make the target differ from the online net so a swapped branch would show.
    parts["target_params"] = jax.tree.map(lambda x: x * 0.9 + 0.01, parts["target_params"])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=parts["params"], opt_state=None,
                       target_params=parts["target_params"], batch_stats=parts["batch_stats"],
                       obj_state=parts["obj_state"], rng=jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    batch = {v: rng.normal(size=(6, 32, 32, 3)).astype(np.float32) for v in ("view1", "view2")}
    loss, aux = jax.jit(objective.loss)(state.params, state, batch, jax.random.PRNGKey(2))

    def branch(params, stats, x, nets):
        h, _ = nets[0].apply({"params": params["backbone"]}, x, train=True)
        for name, net in zip(("projector", "predictor"), nets[1:]):
            h, _ = net.apply({"params": params[name], "batch_stats": stats[name]}, h, train=True,
                             mutable=["batch_stats"])
        return h

    @jax.jit
    def four_calls(state, batch):  # one separate call per view and branch, as the official forward
        on, tg = state.batch_stats["online"], state.batch_stats["target"]
        preds = [branch(state.params, on, batch[v], (online, projector, predictor)) for v in ("view1", "view2")]
        keys = [branch(state.target_params, tg, batch[v], (target, projector)) for v in ("view1", "view2")]
        return preds, keys

    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    (p1, p2), (k1, k2) = jax.tree.map(lambda x: norm(np.asarray(x, np.float64)), four_calls(state, batch))
    q1, q2 = np.asarray(state.obj_state["queue1"]), np.asarray(state.obj_state["queue2"])
    t = config.moby.temperature
    expected = _np_infonce(p1, k2, q2, t).mean() + _np_infonce(p2, k1, q1, t).mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    # Enqueued after the loss: rows [0, 6) now hold this batch's target keys, view-matched.
    np.testing.assert_allclose(np.asarray(aux["obj_state"]["queue1"])[:6], k1, atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["obj_state"]["queue2"])[:6], k2, atol=1e-5)
    assert int(aux["obj_state"]["ptr"]) == 6
