"""swin_ssl.visualize: figures are written and not blank; the maps they draw are what they claim to be."""
import os

import jax
import numpy as np
import pytest
from PIL import Image

from swin_ssl import convert as C
from swin_ssl import visualize as V
from swin_ssl.models import create_model
from test_convert import np_vit


@pytest.fixture(scope="module")
def image_path():
    sklearn = pytest.importorskip("sklearn", reason="scikit-learn (test extra) ships the china.jpg test photo")
    return os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "china.jpg")


def converted_random(name, path, scale=0.3):
    """A converted file with random weights (made without compiling an init)."""
    model = create_model(name)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32),
                                    C.init_variables(model))
    C.save_converted(C.import_state(C.export_slot(params, module=model), name, source="random"), str(path))
    return str(path)


@pytest.fixture(scope="module")
def swin_ckpt(tmp_path_factory):
    return converted_random("swin_test", tmp_path_factory.mktemp("vis") / "swin.msgpack")


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory):
    return converted_random("vit_test", tmp_path_factory.mktemp("vis") / "vit.msgpack")


def assert_not_blank(path):
    assert os.path.isfile(path) and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    pixels = np.asarray(Image.open(path).convert("RGB"), np.float32)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200


@pytest.mark.slow
def test_attention_cli_vit_random_init(tmp_path, image_path):
    out = str(tmp_path / "vit.png")
    assert V.main(["attention", "--model", "vit_test", "--image", image_path, "--out", out]) == 0
    assert_not_blank(out)


def test_vit_cls_attention_is_the_softmax_row(vit_ckpt, image_path):
    module, variables = C.load_backbone(vit_ckpt)
    view = V.center_view(V.load_image(image_path), (32, 32))
    maps = V.vit_cls_attention(module, variables, view[None])
    assert maps.shape == (1, 2, 8, 8)
    # A float64 NumPy ViT forward of the same weights in the official layout (test_convert's reference).
    expected = np_vit(C.export_slot(variables, module=module), V.normalize(view[None]).transpose(0, 3, 1, 2),
                      module.num_heads, last_cls_attention=True)
    np.testing.assert_allclose(maps, expected.reshape(maps.shape), rtol=1e-4, atol=1e-6)
    total = maps.sum((-1, -2))  # CLS -> patches; the rest of the row is CLS -> CLS
    assert (total > 0.1).all() and (total < 1).all()


def test_swin_attention_and_correspondence_from_a_converted_checkpoint(tmp_path, swin_ckpt, image_path):
    """Both CLIs on a converted file; the recomputed last-block attention reproduces the attention module's own
    output through v and the output projection."""
    out = str(tmp_path / "attention.png")
    assert V.main(["attention", "--checkpoint", swin_ckpt, "--image", image_path, "--out", out,
                   "--query", "0.5,0.5", "--query", "0.1,0.9"]) == 0
    assert_not_blank(out)
    out = str(tmp_path / "corr.png")
    assert V.main(["correspondence", "--checkpoint", swin_ckpt, "--image", image_path, "--out", out,
                   "--top-k", "5"]) == 0
    assert_not_blank(out)

    module, variables = C.load_backbone(swin_ckpt)
    view = V.center_view(V.load_image(image_path), (32, 32))
    res = V.swin_last_attention(module, variables, view[None])
    attn, qkv = res["attention"], res["qkv"].astype(np.float64)
    assert res["tokens"].shape == (1, 4, 4, 32) and attn.shape == (1, 2, 16, 16)
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-9)
    v = qkv.reshape(1, 16, 3, 2, 16)[:, :, 2].transpose(0, 2, 1, 3)  # [B, heads, N, hd]
    proj = variables["params"]["layers_1"]["blocks_1"]["attn"]["proj"]
    out = (attn @ v).transpose(0, 2, 1, 3).reshape(1, 16, 32) @ proj["kernel"] + proj["bias"]
    np.testing.assert_allclose(out, res["attn_out"], atol=2e-4, rtol=1e-4)


def test_identical_views_match_themselves_and_count_as_consistent(vit_ckpt, image_path, monkeypatch):
    module, variables = C.load_backbone(vit_ckpt)
    image = V.load_image(image_path)
    fixed = V.random_view(image, (32, 32), np.random.default_rng(3))
    monkeypatch.setattr(V, "random_view", lambda *a, **k: fixed)
    res = V.correspondences(module, variables, image, top_k=10)
    assert len(res["matches"]) == 10
    assert all(i == j and ok and s == pytest.approx(1.0, abs=1e-5) for i, j, s, ok in res["matches"])
    # the geometry: view -> image -> view is the identity, flipped or not
    for flip in (False, True):
        xy = V._to_view(V._to_image((5.0, 7.0), (10, 20, 300, 200), flip, (32, 32)), (10, 20, 300, 200), flip, (32, 32))
        np.testing.assert_allclose(xy, (5.0, 7.0))


def test_swin_without_a_single_last_window_still_draws_similarity(tmp_path, swin_ckpt, image_path):
    out = str(tmp_path / "big.png")  # 64 px on swin_test: last stage 8x8 tokens in four 4x4 windows
    assert V.main(["attention", "--checkpoint", swin_ckpt, "--image-size", "64", "--image", image_path,
                   "--out", out]) == 0
    assert_not_blank(out)


def test_bad_inputs_fail_clearly(tmp_path, image_path, capsys):
    text = tmp_path / "x.txt"
    text.write_text("not an image")
    assert V.main(["attention", "--model", "vit_test", "--image", str(text), "--out", str(tmp_path / "o.png")]) == 1
    assert "not a readable image" in capsys.readouterr().err
    assert V.main(["attention", "--checkpoint", str(tmp_path / "none.msgpack"), "--image", image_path,
                   "--out", str(tmp_path / "o.png")]) == 1
    assert "not found" in capsys.readouterr().err
    assert V.main(["attention", "--checkpoint", str(text), "--image", image_path,
                   "--out", str(tmp_path / "o.png")]) == 1
    assert "not a swin_ssl converted file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.png")
