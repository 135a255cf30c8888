"""Numerical parity with timm: official-layout Swin-T / DeiT-S weights give the same logits in Flax and in timm.

timm lives in a separate CPU torch environment (``SWIN_SSL_TIMM_PYTHON=/path/to/python`` with torch + timm;
default ``/work/torchref/bin/python``), so it runs in a subprocess. The official layout
(downsample at the end of stages 0-2, ``head.*``) goes to timm's (downsample at the start of stages 1-3,
``head.fc.*``) through ``timm.models.swin_transformer.checkpoint_filter_fn`` and is loaded with ``strict=True``.
Weights are random but scaled so that every tensor matters (logits of order 1, relative-position biases of order 0.5).
"""
import json
import os
import subprocess
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from swin_ssl import convert as C
from swin_ssl.models import create_model

try:
    import torch  # noqa: F401  (writes the official-layout .pth)
except ImportError:
    pytest.skip("torch is not installed: pip install torch==2.13.0 (the torch extra)", allow_module_level=True)

MODELS = {"swin_tiny": "swin_tiny_patch4_window7_224", "deit_small": "deit_small_patch16_224"}
TOLERANCE = 1e-4

TIMM_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    import numpy as np, torch, timm
    from timm.models.swin_transformer import checkpoint_filter_fn
    torch.set_num_threads(2)
    x = torch.from_numpy(np.load(sys.argv[2]))
    for job in json.load(open(sys.argv[1])):
        sd = torch.load(job["checkpoint"], map_location="cpu", weights_only=True)["model"]
        model = timm.create_model(job["arch"], pretrained=False, num_classes=sd["head.weight"].shape[0]).eval()
        if "swin" in job["arch"]:
            sd = checkpoint_filter_fn(sd, model)
        model.load_state_dict(sd, strict=True)
        with torch.no_grad():
            np.save(job["out"], model(x).numpy())
        torch.save(model.state_dict(), job["timm_state"])  # timm's own layout
    print("timm", timm.__version__, "torch", torch.__version__)
""")


def timm_python():
    path = os.environ.get("SWIN_SSL_TIMM_PYTHON") or "/work/torchref/bin/python"
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def scaled_random(abstract, seed):
    rng, out = np.random.default_rng(seed), {}
    for path, s in traverse_util.flatten_dict(abstract).items():
        z = rng.standard_normal(s.shape)
        if path[-1] == "kernel":
            z = z / np.sqrt(np.prod(s.shape[:-1]))
        elif path[-1] == "bias":
            z = 0.1 * z
        elif path[-1] == "scale":
            z = 1 + 0.2 * z
        else:  # relative_position_bias_table, cls_token, pos_embed
            z = 0.5 * z
        out[path] = z.astype(np.float32)
    return traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def timm_logits(tmp_path_factory):
    python = timm_python()
    if python is None:
        pytest.skip("no timm python: set SWIN_SSL_TIMM_PYTHON to a python with torch + timm")
    tmp = tmp_path_factory.mktemp("timm")
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    np.save(tmp / "x.npy", x)
    jobs = []
    for i, (name, arch) in enumerate(MODELS.items()):
        model = create_model(name, num_classes=1000)
        C.export_backbone(scaled_random(C.init_variables(model), i), model, str(tmp / f"{name}.pth"))
        jobs.append({"arch": arch, "checkpoint": str(tmp / f"{name}.pth"), "out": str(tmp / f"{name}.npy"),
                     "timm_state": str(tmp / f"{name}_timm.pth")})
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    (tmp / "run.py").write_text(TIMM_SCRIPT)
    r = subprocess.run([python, str(tmp / "run.py"), str(tmp / "jobs.json"), str(tmp / "x.npy")],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and ("No module named 'timm'" in r.stderr or "No module named 'torch'" in r.stderr):
        pytest.skip(f"{python} lacks torch/timm: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    return {"x": x, "dir": tmp, **{name: np.load(tmp / f"{name}.npy") for name in MODELS}}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_timm(timm_logits, name):
    conv = C.import_checkpoint(str(timm_logits["dir"] / f"{name}.pth"), name)
    model = C.build_backbone(name, conv["meta"]["model_kwargs"])
    x = jnp.asarray(timm_logits["x"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    got, _ = jax.jit(model.apply)(conv["variables"]["backbone"], x)
    want = timm_logits[name]
    diff = float(np.abs(np.asarray(got) - want).max())
    print(f"{name}: max |flax - timm| = {diff:.3g} (logit std {want.std():.3g})")
    assert want.shape == (2, 1000) and want.std() > 0.3  # the random weights make the logits non-trivial
    assert diff <= TOLERANCE
    # timm's own state dict (Swin: downsample at the start of stages 1-3, head.fc) imports to the same params
    from_timm = C.import_checkpoint(str(timm_logits["dir"] / f"{name}_timm.pth"), name)
    a, b = traverse_util.flatten_dict(from_timm["variables"]), traverse_util.flatten_dict(conv["variables"])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
