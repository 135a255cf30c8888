"""EsViT under the trainer's parallel paths: jit with a batch sharded over 8 simulated devices
(NamedSharding over Mesh(("data",), AxisType.Auto)) and pmap (explicit pmean of centers / grads) give the
loss, gradients, new centers and metrics of a 1-device step."""
import functools
import re

import jax
import numpy as np
import pytest

from swin_ssl.objectives import dino
from swin_ssl.train import parallel as parallel_lib
from swin_ssl.train import step as step_lib
from test_esvit_objective import compile_fast, durations, make_batch, make_state, tiny_config
from tests.jit_helpers import compile_like_step

GLOBAL_BATCH = 16  # 2 examples per device


def _run(kind, devices):
    par = parallel_lib.make_parallel(kind, devices=devices)
    config = tiny_config(chunk=3)
    config.batch_size = GLOBAL_BATCH
    objective = dino.make_objective(config, durations=durations(), axis_name=par.axis_name)
    state = make_state(objective)
    batch = make_batch(11, batch=GLOBAL_BATCH)

    def fn(state, batch):
        _, loss, aux, grads = step_lib.loss_and_grads(state, batch, objective=objective, axis_name=par.axis_name)
        return loss, grads, aux["obj_state"], aux["metrics"]

    batch = par.put_batch({k: np.asarray(v) for k, v in batch.items()})
    compiled = compile_fast(compile_like_step(par, fn), state, batch)
    return jax.tree.map(np.asarray, compiled(state, batch)), compiled.as_text()


@functools.lru_cache(maxsize=None)
def reference():
    return _run("jit", jax.devices()[:1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["jit", "pmap"])
def test_sharded_paths_match_one_device(kind):
    assert jax.device_count() == 8
    (loss, grads, obj_state, metrics), hlo = _run(kind, jax.devices())
    (ref_loss, ref_grads, ref_obj, ref_metrics), _ = reference()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        scale = max(float(np.abs(r).max()), 1e-3)
        np.testing.assert_allclose(g / scale, r / scale, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    for k in ("center", "center_grid"):  # global means: pmean under pmap, automatic under jit
        np.testing.assert_allclose(obj_state[k], ref_obj[k], rtol=1e-5, atol=1e-6)
    for k in ("view_loss", "region_loss", "teacher_entropy", "kl", "region_kl"):
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-4, atol=1e-6, err_msg=k)
    if kind == "jit":
        # Data parallel for real: no device gathers or reshuffles the batch (the multi-crop forward keeps the
        # sharded batch axis outermost); the only collectives are the all-reduces of loss, grads and centers.
        ops = re.findall(r" (all-gather|all-to-all|all-reduce)(?:-start)?\(", hlo)
        assert "all-reduce" in ops and "all-gather" not in ops and "all-to-all" not in ops, sorted(set(ops))
