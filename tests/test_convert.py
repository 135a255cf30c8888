"""swin_ssl.convert: official PyTorch layouts <-> Flax, checked against hand-built official key layouts and NumPy maths.

The official-layout dicts here are built by hand from the official modules' key names and shapes (not with the
exporter under test), saved with torch.save, imported, checked numerically, exported and compared key by key.
"""
import argparse
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy.special import erf

from swin_ssl import convert as C
from swin_ssl.models import DINOHead, MoBYMLP, create_model
from swin_ssl.models.swin import WindowAttention

try:
    import torch
except ImportError:  # pragma: no cover - CI installs torch through the test extra (lead's call)
    torch = None
needs_torch = pytest.mark.skipif(torch is None,
                                 reason="torch is not installed: pip install torch==2.13.0 (the torch extra)")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeCfgNode(dict):
    """Stands for the yacs CfgNode that official MoBY checkpoints pickle under 'config'."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["__immutable__"] = True


# ---------------------------------------------------------------------------------------------
# Official key layouts, written from the reference tables

def official_index(w):
    """relative_position_index as official Swin builds it (permute, add W-1, multiply the row offset by 2W-1, sum)."""
    coords = np.stack(np.meshgrid(np.arange(w), np.arange(w), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (w - 1)
    return (rel[..., 0] * (2 * w - 1) + rel[..., 1]).astype(np.int64)


def _r(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def official_swin(rng, embed=16, depths=(2, 2), heads=(1, 2), window=4, patch=4, img=32, mlp=2, num_classes=0,
                  index=True, mask=True):
    s = {"patch_embed.proj.weight": _r(rng, embed, 3, patch, patch), "patch_embed.proj.bias": _r(rng, embed),
         "patch_embed.norm.weight": _r(rng, embed), "patch_embed.norm.bias": _r(rng, embed)}
    res = img // patch
    for i, depth in enumerate(depths):
        c, nh = embed * 2 ** i, heads[i]
        w, shift = (res, 0) if res <= window else (window, window // 2)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            s.update({p + "norm1.weight": _r(rng, c), p + "norm1.bias": _r(rng, c),
                      p + "attn.qkv.weight": _r(rng, 3 * c, c), p + "attn.qkv.bias": _r(rng, 3 * c),
                      p + "attn.relative_position_bias_table": _r(rng, (2 * w - 1) ** 2, nh),
                      p + "attn.proj.weight": _r(rng, c, c), p + "attn.proj.bias": _r(rng, c),
                      p + "norm2.weight": _r(rng, c), p + "norm2.bias": _r(rng, c),
                      p + "mlp.fc1.weight": _r(rng, mlp * c, c), p + "mlp.fc1.bias": _r(rng, mlp * c),
                      p + "mlp.fc2.weight": _r(rng, c, mlp * c), p + "mlp.fc2.bias": _r(rng, c)})
            if index:
                s[p + "attn.relative_position_index"] = official_index(w)
            if mask and j % 2 and shift:
                s[p + "attn_mask"] = np.zeros(((res // w) ** 2, w * w, w * w), np.float32)
        if i < len(depths) - 1:
            s.update({f"layers.{i}.downsample.norm.weight": _r(rng, 4 * c),
                      f"layers.{i}.downsample.norm.bias": _r(rng, 4 * c),
                      f"layers.{i}.downsample.reduction.weight": _r(rng, 2 * c, 4 * c)})
        res //= 2
    c = embed * 2 ** (len(depths) - 1)
    s.update({"norm.weight": _r(rng, c), "norm.bias": _r(rng, c)})
    if num_classes:
        s.update({"head.weight": _r(rng, num_classes, c), "head.bias": _r(rng, num_classes)})
    return s


def official_vit(rng, dim=32, depth=2, patch=4, img=32, mlp=2, num_classes=0):
    n = (img // patch) ** 2
    s = {"cls_token": _r(rng, 1, 1, dim), "pos_embed": _r(rng, 1, 1 + n, dim),
         "patch_embed.proj.weight": _r(rng, dim, 3, patch, patch, scale=0.2), "patch_embed.proj.bias": _r(rng, dim)}
    for i in range(depth):
        p = f"blocks.{i}."
        s.update({p + "norm1.weight": 1 + _r(rng, dim, scale=0.2), p + "norm1.bias": _r(rng, dim, scale=0.1),
                  p + "attn.qkv.weight": _r(rng, 3 * dim, dim, scale=dim ** -0.5),
                  p + "attn.qkv.bias": _r(rng, 3 * dim),
                  p + "attn.proj.weight": _r(rng, dim, dim, scale=dim ** -0.5), p + "attn.proj.bias": _r(rng, dim),
                  p + "norm2.weight": 1 + _r(rng, dim, scale=0.2), p + "norm2.bias": _r(rng, dim, scale=0.1),
                  p + "mlp.fc1.weight": _r(rng, mlp * dim, dim, scale=dim ** -0.5),
                  p + "mlp.fc1.bias": _r(rng, mlp * dim),
                  p + "mlp.fc2.weight": _r(rng, dim, mlp * dim, scale=(mlp * dim) ** -0.5),
                  p + "mlp.fc2.bias": _r(rng, dim)})
    s.update({"norm.weight": 1 + _r(rng, dim, scale=0.2), "norm.bias": _r(rng, dim, scale=0.1)})
    if num_classes:
        s.update({"head.weight": _r(rng, num_classes, dim), "head.bias": _r(rng, num_classes)})
    return s


def moby_mlp(rng, prefix, d_in, hidden, out):
    return {prefix + "linear_hidden.1.weight": _r(rng, hidden, d_in), prefix + "linear_hidden.1.bias": _r(rng, hidden),
            prefix + "linear_hidden.2.weight": _r(rng, hidden), prefix + "linear_hidden.2.bias": _r(rng, hidden),
            prefix + "linear_hidden.2.running_mean": _r(rng, hidden),
            prefix + "linear_hidden.2.running_var": np.abs(_r(rng, hidden)) + 0.5,
            prefix + "linear_hidden.2.num_batches_tracked": np.array(0, np.int64),
            prefix + "linear_out.weight": _r(rng, out, hidden), prefix + "linear_out.bias": _r(rng, out)}


def dino_head(rng, prefix, d_in, hidden, bottleneck, out, g_one):
    return {prefix + "mlp.0.weight": _r(rng, hidden, d_in), prefix + "mlp.0.bias": _r(rng, hidden),
            prefix + "mlp.2.weight": _r(rng, hidden, hidden), prefix + "mlp.2.bias": _r(rng, hidden),
            prefix + "mlp.4.weight": _r(rng, bottleneck, hidden), prefix + "mlp.4.bias": _r(rng, bottleneck),
            prefix + "last_layer.weight_g": np.ones((out, 1), np.float32) if g_one else 1 + _r(rng, out, 1, scale=0.3),
            prefix + "last_layer.weight_v": _r(rng, out, bottleneck)}


def to_torch(obj):
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict) and not isinstance(obj, FakeCfgNode):
        return {k: to_torch(v) for k, v in obj.items()}
    return obj


def save(obj, path):
    torch.save(to_torch(obj), path)
    return str(path)


def assert_same_state(got, want, skip=("attn_mask",)):
    """Exact equality, key by key; ``skip`` buffers may be absent from ``got``."""
    want = {k: v for k, v in want.items() if not any(k.endswith(s) for s in skip)}
    got = {k: v for k, v in got.items() if not any(k.endswith(s) for s in skip)}
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def flat(tree):
    return traverse_util.flatten_dict(tree)


def random_params(abstract, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)


# ---------------------------------------------------------------------------------------------
# Layout facts and NumPy re-derivations

def test_swin_tiny_export_has_the_official_keys_and_parameter_count():
    """The official key set, shapes and 28,288,354 parameters of Swin-T with a 1000-class head (eval_shape, zeros)."""
    model = create_model("swin_tiny", num_classes=1000)
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), C.init_variables(model))
    state = C.export_slot(params, module=model, attn_mask=True)
    want = official_swin(np.random.default_rng(0), 96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 4, 224, 4, 1000)
    assert sorted(state) == sorted(want)
    for k in want:
        assert state[k].shape == want[k].shape, k
    assert sum(v.size for k, v in state.items() if not k.endswith(("index", "attn_mask"))) == 28_288_354
    for k, v in state.items():  # regenerated buffers: index anchors, mask counts
        if k.endswith("relative_position_index"):
            np.testing.assert_array_equal(v, official_index(7))
            assert v.dtype == np.int64 and v[0, 0] == 84 and v.sum() == 201684
    masks = {k.split(".")[1]: state[k] for k in state if k.endswith("attn_mask")}
    assert sorted(masks) == ["0", "1", "2"] and len([k for k in state if k.endswith("attn_mask")]) == 5
    anchors = {"0": ((64, 49, 49), 18240), "1": ((16, 49, 49), 8832), "2": ((4, 49, 49), 4128)}
    for stage, (shape, count) in anchors.items():
        assert masks[stage].shape == shape and int((masks[stage] == -100).sum()) == count


def test_bicubic_identity_and_constant():
    m = C.bicubic_matrix(13, 13)
    np.testing.assert_allclose(m, np.eye(13), atol=1e-12)
    np.testing.assert_allclose(C.bicubic_matrix(13, 27).sum(1), 1.0, atol=1e-12)  # weights sum to one


@needs_torch
@pytest.mark.parametrize("n_in,n_out", [(13, 27), (27, 13), (8, 12), (7, 7)])
def test_bicubic_matches_torch_interpolate(n_in, n_out):
    grid = np.random.default_rng(0).standard_normal((n_in, n_in, 5)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(n_out, n_out),
                                           mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    # torch computes the source coordinates and weights in float32
    np.testing.assert_allclose(C.resize_grid(grid, (n_out, n_out)), want, atol=1e-5)


def np_layernorm(x, w, b, eps):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_vit(sd, x, heads, eps=1e-6, last_cls_attention=False):
    """Official/timm ViT forward from the torch-layout state dict (NCHW input): the logits, or with
    ``last_cls_attention`` the last block's attention from CLS to the patch tokens [B, heads, N]."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    b, _, hh, ww = x.shape
    w = sd["patch_embed.proj.weight"]
    d, _, p, _ = w.shape
    patches = x.reshape(b, 3, hh // p, p, ww // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, -1, 3 * p * p)
    t = patches @ w.reshape(d, -1).T + sd["patch_embed.proj.bias"]
    t = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, d)), t], 1) + sd["pos_embed"]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        g = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        h = np_layernorm(t, g("norm1.weight"), g("norm1.bias"), eps)
        qkv = h @ g("attn.qkv.weight").T + g("attn.qkv.bias")
        qkv = qkv.reshape(b, -1, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
        att = np_softmax(qkv[0] * (d // heads) ** -0.5 @ qkv[1].transpose(0, 1, 3, 2))
        if last_cls_attention and f"blocks.{i + 1}.norm1.weight" not in sd:
            return att[:, :, 0, 1:]
        o = (att @ qkv[2]).transpose(0, 2, 1, 3).reshape(b, -1, d)
        t = t + o @ g("attn.proj.weight").T + g("attn.proj.bias")
        h = np_layernorm(t, g("norm2.weight"), g("norm2.bias"), eps)
        t = t + np_gelu(h @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")) @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
        i += 1
    t = np_layernorm(t, sd["norm.weight"], sd["norm.bias"], eps)
    return t[:, 0] @ sd["head.weight"].T + sd["head.bias"]


@needs_torch
def test_vit_import_matches_numpy_forward(tmp_path):
    """qkv rows (3, heads, head_dim), conv and LayerNorm mapping: Flax logits == a NumPy forward of the torch
    weights."""
    sd = official_vit(np.random.default_rng(1), num_classes=7)
    conv = C.import_checkpoint(save({"model": sd}, tmp_path / "vit.pth"), "vit_test")
    assert conv["meta"]["layout"] == "backbone" and conv["meta"]["model_kwargs"] == {"num_classes": 7}
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    model = C.build_backbone("vit_test", conv["meta"]["model_kwargs"])
    got, _ = jax.jit(model.apply)(conv["variables"]["backbone"], jnp.asarray(x.transpose(0, 2, 3, 1)))
    want = np_vit(sd, x.astype(np.float64), heads=2)
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-4)


@needs_torch
def test_swin_window_attention_matches_numpy(tmp_path):
    """Relative-position table + official index and qkv layout, on one window of the converted block."""
    sd = official_swin(np.random.default_rng(3))
    conv = C.import_checkpoint(save({"model": sd}, tmp_path / "swin.pth"), "swin_test")
    params = conv["variables"]["backbone"]["params"]["layers_0"]["blocks_1"]["attn"]
    x = np.random.default_rng(4).standard_normal((3, 16, 16)).astype(np.float32)
    got = WindowAttention(num_heads=1, window=4).apply({"params": params}, jnp.asarray(x), None)
    p = "layers.0.blocks.1.attn."
    qkv = (x @ sd[p + "qkv.weight"].T + sd[p + "qkv.bias"]).reshape(3, 16, 3, 1, 16).transpose(2, 0, 3, 1, 4)
    bias = sd[p + "relative_position_bias_table"][official_index(4).reshape(-1)].reshape(16, 16, 1).transpose(2, 0, 1)
    att = np_softmax(qkv[0] * 16 ** -0.5 @ qkv[1].transpose(0, 1, 3, 2) + bias)
    want = (att @ qkv[2]).transpose(0, 2, 1, 3).reshape(3, 16, 16) @ sd[p + "proj.weight"].T + sd[p + "proj.bias"]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Round trips (exact)

@pytest.mark.slow
@needs_torch
@pytest.mark.parametrize("name,num_classes",
                         [("swin_test", 5), ("vit_test", 0), ("swin_tiny", 1000), ("deit_small", 0)])
def test_flax_official_flax_round_trip_is_exact(tmp_path, name, num_classes):
    """Flax -> official .pth -> Flax, real Swin-T / DeiT-S sizes included (random weights)."""
    model = create_model(name, num_classes=num_classes)
    params = random_params(C.init_variables(model))
    path = str(tmp_path / f"{name}.pth")
    C.export_backbone(params, name, path, model_kwargs={"num_classes": num_classes})
    raw = torch.load(path, weights_only=True)["model"]
    if name.startswith("swin"):
        assert raw["layers.0.blocks.0.attn.relative_position_index"].dtype == torch.int64
        assert "head.weight" in raw and "layers.0.downsample.reduction.weight" in raw
    back = C.import_checkpoint(path, name)
    assert back["meta"]["model_kwargs"].get("num_classes", 0) == num_classes
    a, b = flat(back["variables"]["backbone"]), flat(params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    C.save_converted(back, str(tmp_path / "c.msgpack"))  # and through the converted file
    again = C.load_converted(str(tmp_path / "c.msgpack"))
    assert again["meta"] == back["meta"]
    for k, v in flat(again["variables"]["backbone"]).items():
        np.testing.assert_array_equal(v, b[k])


@needs_torch
def test_official_swin_round_trip_and_placement(tmp_path):
    sd = official_swin(np.random.default_rng(5), num_classes=3)
    conv = C.import_checkpoint(save({"model": sd, "epoch": 3}, tmp_path / "s.pth"), "swin_test")
    p = conv["variables"]["backbone"]["params"]
    np.testing.assert_array_equal(p["layers_1"]["blocks_0"]["attn"]["qkv"]["kernel"],
                                  sd["layers.1.blocks.0.attn.qkv.weight"].T)
    np.testing.assert_array_equal(p["patch_embed"]["proj"]["kernel"],
                                  sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["layers_0"]["downsample"]["norm"]["scale"], sd["layers.0.downsample.norm.weight"])
    np.testing.assert_array_equal(p["head"]["kernel"], sd["head.weight"].T)
    assert conv["meta"]["report"]["dropped"] == 5  # 4 indices + 1 mask (stage 1 shifted, stage 2 not)
    out = C.export_state(conv, attn_mask=False)
    assert_same_state(out["model"], sd)  # indices regenerated equal the official ones
    headless = C.import_checkpoint(str(tmp_path / "s.pth"), "swin_test", model_kwargs={"num_classes": 0})
    assert "head" not in headless["variables"]["backbone"]["params"] and headless["meta"]["report"]["dropped"] == 7
    with_mask = C.export_state(conv, attn_mask=True)["model"]
    assert [k for k in with_mask if k.endswith("attn_mask")] == ["layers.0.blocks.1.attn_mask"]


@needs_torch
def test_moby_layout_round_trip(tmp_path):
    """MoBY {'model': encoder., encoder_k., projector(_k)., predictor., queues} with a pickled config object."""
    rng = np.random.default_rng(6)
    model = {}
    model.update({"encoder." + k: v for k, v in official_swin(rng).items()})
    model.update({"encoder_k." + k: v for k, v in official_swin(rng).items()})
    model.update(moby_mlp(rng, "projector.", 32, 24, 8))
    model.update(moby_mlp(rng, "projector_k.", 32, 24, 8))
    model.update(moby_mlp(rng, "predictor.", 8, 24, 8))
    q1, q2 = _r(rng, 8, 40), _r(rng, 8, 40)
    model.update({"queue1": q1, "queue2": q2, "queue_ptr": np.array([16], np.int64)})
    ckpt = {"model": model, "optimizer": {"state": {}}, "epoch": 99, "max_accuracy": 0.0,
            "config": FakeCfgNode(MODEL=FakeCfgNode(TYPE="moby"), LR=1e-3)}
    path = save(ckpt, tmp_path / "moby.pth")
    with pytest.raises(Exception, match="Unsupported global"):  # weights_only refuses the config object ...
        torch.load(path, weights_only=True)
    config = C.read_pth(path)["config"]  # ... the restricted fallback keeps it as inert data
    assert isinstance(config, C._Opaque) and config["MODEL"]["TYPE"] == "moby"
    conv = C.import_checkpoint(path, "swin_test")
    meta, v = conv["meta"], conv["variables"]
    assert meta["layout"] == "moby"
    assert meta["heads"]["projector"]["kwargs"] == {"hidden_dim": 24, "out_dim": 8, "num_layers": 2}
    assert sorted(v) == ["obj_state", "online", "target"] and sorted(v["target"]) == ["backbone", "projector"]
    bn = v["online"]["projector"]["batch_stats"]["bn_0"]
    np.testing.assert_array_equal(bn["var"], model["projector.linear_hidden.2.running_var"])
    np.testing.assert_array_equal(v["online"]["predictor"]["params"]["hidden_0"]["kernel"],
                                  model["predictor.linear_hidden.1.weight"].T)
    np.testing.assert_array_equal(v["obj_state"]["queue2"], q2.T)  # train-state layout [K, dim]
    assert v["obj_state"]["ptr"].dtype == np.int32 and int(v["obj_state"]["ptr"]) == 16
    parts = C.train_state_parts(conv)
    assert sorted(parts["params"]) == ["backbone", "predictor", "projector"]
    assert sorted(parts["target_params"]) == ["backbone", "projector"]
    assert sorted(parts["batch_stats"]["online"]) == ["predictor", "projector"]
    assert sorted(parts["batch_stats"]["target"]) == ["projector"]
    # the head maths: Linear -> BN (running stats) -> ReLU -> Linear, in NumPy
    x = _r(rng, 4, 32)
    g = lambda n: model["projector." + n].astype(np.float64)  # noqa: E731
    h = x @ g("linear_hidden.1.weight").T + g("linear_hidden.1.bias")
    h = (h - g("linear_hidden.2.running_mean")) / np.sqrt(g("linear_hidden.2.running_var") + 1e-5)
    h = np.maximum(h * g("linear_hidden.2.weight") + g("linear_hidden.2.bias"), 0)
    want = h @ g("linear_out.weight").T + g("linear_out.bias")
    got = MoBYMLP(**meta["heads"]["projector"]["kwargs"]).apply(v["online"]["projector"], jnp.asarray(x), train=False)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
    out = C.export_state(conv)
    assert sorted(out) == ["model"]
    assert_same_state(out["model"], model)
    module, bb = C.load_backbone_from(conv)  # MoBY evaluates the online encoder
    np.testing.assert_array_equal(bb["params"]["norm"]["scale"], model["encoder.norm.weight"])


@needs_torch
@pytest.mark.parametrize("g_one", [False, True])
def test_esvit_layout_round_trip(tmp_path, g_one):
    """EsViT {'student': module.*, 'teacher': *, 'dino_loss'}: Swin keys at top level + head.*, head_dense.*."""
    rng = np.random.default_rng(7)
    groups = {}
    for group in ("student", "teacher"):
        sd = official_swin(rng, mask=False)  # EsViT keeps masks in a plain dict: only the index is stored
        sd.update(dino_head(rng, "head.", 32, 12, 6, 20, g_one))
        sd.update(dino_head(rng, "head_dense.", 32, 12, 6, 20, g_one))
        groups[group] = sd
    loss = {"center": _r(rng, 1, 20), "center_grid": _r(rng, 1, 20)}
    ckpt = {"student": {"module." + k: v for k, v in groups["student"].items()}, "teacher": groups["teacher"],
            "dino_loss": loss, "epoch": 300, "args": argparse.Namespace(arch="swin_tiny", lr=5e-4)}
    conv = C.import_checkpoint(save(ckpt, tmp_path / "esvit.pth"), "swin_test")
    meta, v = conv["meta"], conv["variables"]
    assert meta["layout"] == "esvit" and meta["model_kwargs"]["norm_eps"] == 1e-6
    assert meta["heads"]["head"]["kwargs"] == dict(num_layers=3, hidden_dim=12, bottleneck_dim=6, out_dim=20,
                                                   norm_last_layer=g_one)
    head = v["teacher"]["head_dense"]["params"]
    np.testing.assert_array_equal(head["mlp_2"]["kernel"], groups["teacher"]["head_dense.mlp.4.weight"].T)
    np.testing.assert_array_equal(head["last_layer"]["kernel_v"], groups["teacher"]["head_dense.last_layer.weight_v"].T)
    assert ("scale_g" in head["last_layer"]) == (not g_one)
    np.testing.assert_array_equal(v["obj_state"]["center_grid"], loss["center_grid"][0])
    parts = C.train_state_parts(conv)
    assert sorted(parts["params"]) == sorted(parts["target_params"]) == ["backbone", "head", "head_dense"]
    assert parts["batch_stats"] == {"online": {}, "target": {}}
    # DINO head maths: GELU MLP -> L2 normalise -> W = g v / ||v|| (rows)
    x = _r(rng, 3, 32)
    g = lambda n: groups["student"]["head." + n].astype(np.float64)  # noqa: E731
    h = np_gelu(x @ g("mlp.0.weight").T + g("mlp.0.bias"))
    h = np_gelu(h @ g("mlp.2.weight").T + g("mlp.2.bias"))
    h = h @ g("mlp.4.weight").T + g("mlp.4.bias")
    h = h / np.linalg.norm(h, axis=-1, keepdims=True)
    v_rows = g("last_layer.weight_v")
    w = g("last_layer.weight_g") * v_rows / np.linalg.norm(v_rows, axis=1, keepdims=True)
    got = DINOHead(**meta["heads"]["head"]["kwargs"]).apply(v["student"]["head"], jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), h @ w.T, atol=1e-5)
    out = C.export_state(conv)
    assert sorted(out) == ["dino_loss", "student", "teacher"]
    assert_same_state(out["student"], ckpt["student"])
    assert_same_state(out["teacher"], ckpt["teacher"])
    assert_same_state(out["dino_loss"], loss)
    module, bb = C.load_backbone_from(conv)  # EsViT evaluates the teacher
    np.testing.assert_array_equal(bb["params"]["norm"]["bias"], groups["teacher"]["norm.bias"])


@needs_torch
def test_dino_vit_layout_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    teacher = {"backbone." + k: v for k, v in official_vit(rng).items()}
    teacher.update(dino_head(rng, "head.", 32, 16, 8, 30, g_one=True))
    ckpt = {"teacher": teacher, "dino_loss": {"center": _r(rng, 1, 30)}}
    conv = C.import_checkpoint(save(ckpt, tmp_path / "dino.pth"), "vit_test")
    assert conv["meta"]["layout"] == "dino" and sorted(conv["variables"]) == ["obj_state", "teacher"]
    assert conv["meta"]["heads"]["head"]["kwargs"]["norm_last_layer"] is True
    assert_same_state(C.export_state(conv)["teacher"], teacher)
    only = C.export_state(conv, which="teacher")["model"]
    assert_same_state(only, {k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")})


# ---------------------------------------------------------------------------------------------
# Resizing

@needs_torch
def test_window_change_resizes_relative_position_tables(tmp_path):
    sd = official_swin(np.random.default_rng(9))
    conv = C.import_checkpoint(save({"model": sd}, tmp_path / "s.pth"), "swin_test", model_kwargs={"window_size": 8})
    p = conv["variables"]["backbone"]["params"]
    table = p["layers_0"]["blocks_0"]["attn"]["relative_position_bias_table"]
    assert table.shape == (225, 1)  # stage 1: 8x8 map, window 8 -> (2*8-1)^2; stage 2 (4x4 map) keeps 49 rows
    assert p["layers_1"]["blocks_0"]["attn"]["relative_position_bias_table"].shape == (49, 2)
    want = torch.nn.functional.interpolate(torch.from_numpy(sd["layers.0.blocks.0.attn.relative_position_bias_table"])
                                           .T.reshape(1, 1, 7, 7), size=(15, 15), mode="bicubic").reshape(1, 225).T
    np.testing.assert_allclose(table, want.numpy(), atol=1e-5)  # torch computes the weights in float32
    assert len(conv["meta"]["report"]["resized"]) == 2
    with pytest.raises(C.ConversionError, match="mis-shaped"):
        C.import_checkpoint(str(tmp_path / "s.pth"), "swin_test", model_kwargs={"window_size": 8}, resize=False)


@needs_torch
def test_resolution_change_resizes_vit_position_embedding(tmp_path):
    sd = official_vit(np.random.default_rng(10))
    conv = C.import_checkpoint(save(sd, tmp_path / "v.pth"), "vit_test", model_kwargs={"img_size": 48})
    pos = conv["variables"]["backbone"]["params"]["pos_embed"]
    assert pos.shape == (1, 1 + 144, 32)
    np.testing.assert_array_equal(pos[:, 0], sd["pos_embed"][:, 0])  # CLS kept
    grid = torch.from_numpy(sd["pos_embed"][0, 1:].reshape(8, 8, 32)).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(grid, size=(12, 12), mode="bicubic")[0].permute(1, 2, 0).reshape(144, 32)
    np.testing.assert_allclose(pos[0, 1:], want.numpy(), atol=1e-5)  # torch computes the weights in float32


# ---------------------------------------------------------------------------------------------
# Errors

@needs_torch
def test_deit_small_given_as_swin_tiny_fails_with_one_complete_error(tmp_path):
    model = create_model("deit_small")
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), C.init_variables(model))
    path = str(tmp_path / "moby_swin_t_300ep_pretrained.pth")  # the official README links these two files the wrong way round
    C.export_backbone(params, model, path)
    with pytest.raises(C.ConversionError) as err:
        C.import_checkpoint(path, "swin_tiny")
    msg = str(err.value)
    assert path in msg and "'swin_tiny'" in msg
    assert "167 missing, 146 unexpected, 4 mis-shaped" in msg  # every tensor of both sides is listed
    for key in ("pos_embed [1,197,384]", "cls_token [1,1,384]", "blocks.11.mlp.fc2.bias [384]",
                "layers.3.blocks.1.attn.qkv.weight [2304,768]"):
        assert key in msg
    assert "patch_embed.proj.weight: checkpoint [384,3,16,16], model expects [96,3,4,4]" in msg
    assert "deit_small" in msg.split("hint:")[1]


@needs_torch
def test_non_strict_reports_and_keeps_init(tmp_path):
    sd = official_vit(np.random.default_rng(11))
    del sd["blocks.1.mlp.fc2.bias"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["norm.weight"] = np.zeros(7, np.float32)
    path = save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(C.ConversionError) as err:
        C.import_checkpoint(path, "vit_test")
    msg = str(err.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in msg
    for s in ("blocks.1.mlp.fc2.bias [32]", "extra.weight [3]", "norm.weight: checkpoint [7], model expects [32]"):
        assert s in msg
    conv = C.import_checkpoint(path, "vit_test", strict=False)
    rep = conv["meta"]["report"]
    assert len(rep["missing"]) == len(rep["unexpected"]) == len(rep["mismatched"]) == 1
    p = conv["variables"]["backbone"]["params"]
    np.testing.assert_array_equal(p["norm"]["scale"], np.ones(32))  # LayerNorm init
    np.testing.assert_array_equal(p["blocks_1"]["mlp"]["fc2"]["bias"], np.zeros(32))  # Dense bias init
    np.testing.assert_array_equal(p["blocks_0"]["mlp"]["fc1"]["bias"], sd["blocks.0.mlp.fc1.bias"])


@needs_torch
def test_truncated_and_foreign_files_fail_clearly(tmp_path):
    path = save({"model": official_swin(np.random.default_rng(12))}, tmp_path / "ok.pth")
    data = open(path, "rb").read()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(C.ConversionError, match="truncated"):
        C.import_checkpoint(str(cut), "swin_test")
    import sklearn
    jpg = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "china.jpg")
    with pytest.raises(C.ConversionError, match="is not a PyTorch checkpoint"):
        C.import_checkpoint(jpg, "swin_test")
    text = tmp_path / "notes.txt"
    text.write_text("model weights live elsewhere\n")
    with pytest.raises(C.ConversionError, match="is not a PyTorch checkpoint"):
        C.import_checkpoint(str(text), "swin_test")
    torch.save({"epoch": 1, "optimizer": {}}, tmp_path / "opt.pth")
    with pytest.raises(C.ConversionError, match="no tensors"):
        C.import_checkpoint(str(tmp_path / "opt.pth"), "swin_test")
    conv = C.import_checkpoint(path, "swin_test")
    C.save_converted(conv, str(tmp_path / "c.msgpack"))
    raw = open(tmp_path / "c.msgpack", "rb").read()
    (tmp_path / "c_cut.msgpack").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(C.ConversionError, match="truncated"):
        C.load_converted(str(tmp_path / "c_cut.msgpack"))
    with pytest.raises(FileNotFoundError):
        C.import_checkpoint(str(tmp_path / "nope.pth"), "swin_test")


def test_missing_torch_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
        C.write_pth({"model": {}}, str(tmp_path / "y.pth"))
    good = tmp_path / "z.pth"
    good.write_bytes(b"\x80\x02" + b"\0" * 10)
    with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
        C.read_pth(str(good))


# ---------------------------------------------------------------------------------------------
# CLI

def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "swin_ssl.convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@needs_torch
def test_cli_import_export_inspect(tmp_path):
    sd = official_swin(np.random.default_rng(13))
    src = save({"model": sd}, tmp_path / "swin.pth")
    out = str(tmp_path / "swin.msgpack")
    assert C.main(["import", src, "--model", "swin_test", "--out", out]) == 0
    assert C.main(["export", out, "--out", str(tmp_path / "back.pth")]) == 0
    assert_same_state(C.read_pth(str(tmp_path / "back.pth"))["model"], sd)
    r = _cli("inspect", src)
    assert r.returncode == 0 and "swin_test" in r.stdout and "layout backbone" in r.stdout, r.stderr
    r = _cli("import", src, "--model", "vit_test", "--out", str(tmp_path / "bad.msgpack"))
    assert r.returncode == 1 and "does not fit model 'vit_test'" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "bad.msgpack")


def test_evaluators_read_converted_files(tmp_path):
    """The evaluators' params_file loader picks the teacher/student backbone out of a converted EsViT file."""
    from swin_ssl.evaluators import loading
    rng = np.random.default_rng(14)
    flat_state = {}
    for group in ("student", "teacher"):
        flat_state.update({f"{group}.{k}": v for k, v in official_swin(rng).items()})
        flat_state.update({f"{group}.{k}": v for k, v in dino_head(rng, "head.", 32, 12, 6, 20, True).items()})
    conv = C.import_state(flat_state, "swin_test", "esvit")
    path = str(tmp_path / "esvit.msgpack")
    C.save_converted(conv, path)
    tree = loading.load_params_file(path)
    expected = loading.expected_params(create_model("swin_test"), (32, 32, 3))
    for network, group in (("target", "teacher"), ("online", "student")):
        got = loading.select_network(tree, network)
        loading.check_params(expected, got)
        np.testing.assert_array_equal(got["norm"]["scale"], flat_state[f"{group}.norm.weight"])


def test_evaluator_builds_the_model_from_converted_model_kwargs(tmp_path):
    """evaluate.py on a converted file builds the backbone with the file's meta["model_kwargs"] (EsViT's norm_eps
    1e-6, a non-default window) without the user setting them; its features equal a direct apply."""
    from configs import knn as knn_config
    from swin_ssl.evaluators import run
    rng = np.random.default_rng(16)
    flat_state = {}
    for group in ("student", "teacher"):
        flat_state.update({f"{group}.{k}": v for k, v in official_swin(rng, window=2).items()})
        flat_state.update({f"{group}.{k}": v for k, v in dino_head(rng, "head.", 32, 12, 6, 20, True).items()})
    conv = C.import_state(flat_state, "swin_test", "esvit", model_kwargs={"window_size": 2})
    assert conv["meta"]["model_kwargs"] == {"window_size": 2, "norm_eps": 1e-6}
    path = str(tmp_path / "esvit_w2.msgpack")
    C.save_converted(conv, path)
    config = knn_config.get_config("smoke")
    config.init, config.params_path, config.model.name, config.network = "params_file", path, "", "default"
    model, params, info = run.load(config)
    assert info["model"] == "swin_test" and info["network"] == "target"
    assert (model.window_size, model.norm_eps, model.num_classes) == (2, 1e-6, 0)
    direct = create_model("swin_test", window_size=2, norm_eps=1e-6)
    teacher = conv["variables"]["teacher"]["backbone"]
    images = np.random.default_rng(17).normal(size=(2, 32, 32, 3)).astype(np.float32)
    got = model.apply({"params": params}, images)[1]
    want = direct.apply(teacher, images)[1]
    for name in ("pooled", "tokens"):
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-6, atol=1e-6)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["SWIN_SSL_EVIL_MARK"],))


class Sneaky:
    """A side effect through a module torch does not block outright (pathlib)."""

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(os.environ["SWIN_SSL_EVIL_MARK"]),))


@needs_torch
def test_no_pickled_code_runs(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("SWIN_SSL_EVIL_MARK", str(mark))
    sd = official_vit(np.random.default_rng(15))
    path = save({"model": sd, "evil": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(C.ConversionError, match="blocked global posix.system"):
        C.read_pth(path)
    path = save({"model": sd, "extra": Sneaky()}, tmp_path / "sneaky.pth")
    with pytest.raises(C.ConversionError, match="blocked global __builtin__.getattr"):  # pickled as getattr(...)
        C.import_checkpoint(path, "vit_test")
    assert not mark.exists()


@pytest.mark.slow
@needs_torch
def test_export_from_a_training_workdir(tmp_path):
    """The teacher of a run (orbax checkpoint written by swin_ssl.checkpoint) -> official .pth."""
    from swin_ssl import checkpoint
    model = create_model("swin_test")
    online, target = random_params(C.init_variables(model), 1), random_params(C.init_variables(model), 2)
    state = {"step": np.array(7), "params": {"backbone": online["params"]},
             "target_params": {"backbone": target["params"]}, "obj_state": {"center": np.zeros(4, np.float32)}}
    meta = {"step": 7, "objective": "esvit", "model": "swin_test", "eval_backbone": "target",
            "config": {"data": {"image_size": 32}, "model": {"overrides": {"norm_eps": 1e-6}}}}
    manager = checkpoint.make_manager(str(tmp_path / "run"), every_steps=1, keep=1, asynchronous=False)
    checkpoint.save(manager, 7, state, meta, force=True)
    manager.wait_until_finished()
    manager.close()
    out = str(tmp_path / "teacher.pth")
    assert C.main(["export", str(tmp_path / "run"), "--out", out, "--attn-mask"]) == 0
    assert_same_state(C.read_pth(out)["model"], C.export_slot(target, module=model, attn_mask=True), skip=())
