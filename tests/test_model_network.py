"""MaskSAM network: output contract, adapters, decoder paths, freezing, bf16, state files."""

from __future__ import annotations

import pytest
import torch

from masksam.model import (
    WeightsError,
    MaskSAMConfig,
    build_masksam,
    load_masksam_state,
    parameter_report,
    read_masksam_config,
    save_masksam_state,
)
from masksam.model.adapters import DepthConvAdapter, DepthMLPAdapter
from masksam.model.masksam import MaskSAM
from masksam.model.params import is_new_parameter
from masksam.model.prompt_generator import mask_boxes


def _tiny(**kw) -> MaskSAM:
    torch.manual_seed(0)
    base = dict(variant="tiny", img_size=64, slab_depth=4, num_classes=3, num_queries=4, freeze_sam=False)
    base.update(kw)
    return build_masksam(MaskSAMConfig(**base))


def _randomise_zero_inits(model: torch.nn.Module) -> None:
    """Give the zero-initialised adapter/upsampler outputs and temporal embeddings real values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_new_parameter(name) and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_tiny_output_contract():
    m = _tiny()
    x = torch.randn(2, 1, 4, 64, 64)
    out = m(x)
    assert out["pred_logits"].shape == (2, 4, 4, 4)
    assert out["pred_masks"].shape == (2, 4, 4, 64, 64)
    assert out["aux_masks"].shape == (2, 4, 4, 16, 16)
    assert out["aux_boxes"].shape == (2, 4, 4, 4)
    b = out["aux_boxes"]
    assert (b >= 0).all() and (b <= 1).all() and (b[..., 2] >= b[..., 0]).all() and (b[..., 3] >= b[..., 1]).all()
    cp = m.class_probs(x)
    assert cp.shape == (2, 3, 4, 64, 64)
    # class_probs == sum_q softmax(no "no object") * sigmoid(mask), computed by hand
    probs = out["pred_logits"].softmax(-1)[..., :-1]
    ref = torch.zeros(2, 3, 4, 64, 64)
    for q in range(4):
        ref += probs[:, :, q, :, None, None].permute(0, 2, 1, 3, 4) * out["pred_masks"][:, :, q].sigmoid()[:, None]
    torch.testing.assert_close(cp, ref, atol=1e-5, rtol=1e-5)


def test_tiny_with_patch_8_doubles_every_grid_and_keeps_the_contract():
    """The demo's tiny uses ViT patch 8: token grid, aux masks and the upsampler follow it."""
    m = _tiny(patch_size=8)
    x = torch.randn(1, 1, 4, 64, 64)
    out = m(x)
    assert out["pred_logits"].shape == (1, 4, 4, 4)
    assert out["pred_masks"].shape == (1, 4, 4, 64, 64)
    assert out["aux_masks"].shape == (1, 4, 4, 32, 32)
    assert m.class_probs(x).shape == (1, 3, 4, 64, 64)
    with pytest.raises(ValueError, match="keeps SAM's patch_size 16"):
        MaskSAMConfig(variant="vit_b", img_size=256, patch_size=8)


def test_any_slab_depth_and_bad_input():
    m = _tiny()
    assert m(torch.randn(1, 1, 3, 64, 64))["pred_masks"].shape == (1, 3, 4, 64, 64)
    with pytest.raises(ValueError, match="64x64"):
        m(torch.randn(1, 1, 4, 48, 48))
    with pytest.raises(ValueError, match="multiple of 16"):
        MaskSAMConfig(img_size=100)
    with pytest.raises(ValueError, match="unknown MaskSAMConfig keys"):
        MaskSAMConfig.from_dict({"variant": "tiny", "imgsize": 64})


def test_depth_conv_adapter_mixes_neighbouring_slices_only():
    torch.manual_seed(0)
    ad = DepthConvAdapter(16)
    torch.nn.init.normal_(ad.up.weight)
    x = torch.randn(5, 6, 6, 16)  # one slab of T=5 slices, 6x6 tokens
    y0 = ad(x, depth=5)
    x2 = x.clone()
    x2[0, 3, 3] += 1.0  # perturb one token of slice 0
    d = (ad(x2, depth=5) - y0).abs().sum(dim=-1)  # [T, h, w]
    assert d[1, 3, 3] > 0 and d[0, 2, 2] > 0  # next slice and in-plane neighbours change
    assert d[2].max() == 0 and d[0, 0, 0] == 0  # two slices away / far tokens do not
    # two slabs in a batch do not mix
    y_b = ad(torch.cat([x, x2]), depth=5)
    torch.testing.assert_close(y_b[:5], y0)


def test_depth_mlp_adapter_acts_along_slices_per_query():
    torch.manual_seed(0)
    ad = DepthMLPAdapter(8)
    torch.nn.init.normal_(ad.up.weight)
    tok = torch.randn(1 * 4 * 3, 5, 8)  # B=1, T=4, Q=3, N=5 tokens
    y0 = ad(tok, depth=4, num_queries=3)
    tok2 = tok.clone()
    tok2[0, 2] += 1.0  # slice 0, query 0, token 2
    d = (ad(tok2, depth=4, num_queries=3) - y0).abs().sum(-1).reshape(4, 3, 5)
    assert d[1, 0, 2] > 0  # same query and token, next slice
    assert d[:, 1:].max() == 0 and d[:, 0, 0].max() == 0 and d[3].max() == 0


def test_zero_init_adapters_are_identity_at_start():
    on = _tiny()
    off = _tiny(use_depth_conv_adapter=False, use_depth_mlp_adapter=False, use_temporal_embedding=False)
    sd = {k: v for k, v in on.state_dict().items() if k in off.state_dict()}
    off.load_state_dict(sd, strict=True)
    x = torch.randn(1, 1, 4, 64, 64)
    a, b = on(x), off(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
    _randomise_zero_inits(on)
    assert not torch.allclose(on(x)["pred_logits"], b["pred_logits"], atol=1e-4)


def test_batched_decoder_equals_reference_loop():
    m = _tiny()
    _randomise_zero_inits(m)
    x = torch.randn(2, 1, 4, 64, 64)
    with torch.no_grad():
        fast = m(x)
        m.cfg.decoder_mode = "loop"
        ref = m(x)
    for k in fast:
        torch.testing.assert_close(fast[k], ref[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("freeze,boxes,tokens", [(True, True, True), (False, True, True), (False, False, True),
                                                 (True, True, False), (False, True, False)])
def test_gradients_reach_exactly_the_trainable_parameters(freeze, boxes, tokens):
    """Every trainable parameter gets a gradient (DDP needs no find_unused_parameters); without
    aux classifier tokens the light prompt generator builds no token head at all."""
    m = _tiny(freeze_sam=freeze, use_aux_boxes=boxes, use_aux_class_tokens=tokens)
    assert any(n.startswith("prompt_generator.token_head.") for n, _ in m.named_parameters()) == tokens
    _randomise_zero_inits(m)
    out = m(torch.randn(1, 1, 4, 64, 64))
    (out["pred_logits"].sum() + out["pred_masks"].mean() + out["aux_masks"].mean() + out["aux_boxes"].sum()).backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable
    new = {n for n, _ in m.named_parameters() if is_new_parameter(n)}
    if freeze:
        assert trainable == new
    else:
        assert new < trainable
    rep = parameter_report(m)
    assert rep["trainable"] == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert sum(d["total"] for d in rep["parts"].values()) == rep["total"]


def test_bf16_autocast_has_no_nan():
    m = _tiny()
    x = torch.randn(1, 1, 4, 64, 64) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        cp = m.class_probs(x)
    for v in list(out.values()) + [cp]:
        assert torch.isfinite(v.float()).all()


def test_mask_boxes():
    logits = torch.full((2, 8, 10), -1.0)
    logits[0, 2:5, 3:9] = 1.0
    box, nonempty = mask_boxes(logits)
    torch.testing.assert_close(box[0], torch.tensor([3 / 10, 2 / 8, 9 / 10, 5 / 8]))
    assert nonempty.tolist() == [True, False] and box[1].abs().sum() == 0


def test_state_file_roundtrip(tmp_path):
    m = _tiny()
    _randomise_zero_inits(m)
    path = tmp_path / "w.safetensors"
    save_masksam_state(m, path)
    cfg = read_masksam_config(path)
    assert cfg == m.cfg
    m2 = build_masksam(cfg)
    load_masksam_state(m2, path)
    x = torch.randn(1, 1, 4, 64, 64)
    torch.testing.assert_close(m(x)["pred_masks"], m2(x)["pred_masks"])
    other = _tiny(num_classes=5)
    with pytest.raises(WeightsError, match="mask_decoder.cls_head.weight"):
        load_masksam_state(other, path)


def assert_onnx_matches_eager(m: MaskSAM, tmp_path) -> None:
    """Export ``m.class_probs`` (as components/export.py does) and compare ONNX Runtime's output
    with PyTorch's on one 2 x 32 x 32 slab (1e-5); the model needs img_size 32, slab_depth 2."""
    import warnings

    import numpy as np
    import onnxruntime as ort

    from masksam.model import ClassProbs

    _randomise_zero_inits(m)
    x = torch.randn(1, 1, 2, 32, 32)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ClassProbs(m), (x,), str(path), input_names=["x"], output_names=["probs"],
                          opset_version=18, dynamo=False)
    y = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = m.class_probs(x).numpy()
    assert y.shape == (1, 3, 2, 32, 32)
    np.testing.assert_allclose(y, ref, atol=1e-5)


def test_class_probs_exports_to_onnx_and_matches(tmp_path):
    """class_probs is the exported graph: it must trace and run in ONNX Runtime unchanged."""
    assert_onnx_matches_eager(_tiny(img_size=32, slab_depth=2, num_queries=2).eval(), tmp_path)


def test_fast_upsampler_and_patch_embed_equal_the_reference_ops():
    """The matmul forms (kept for CPU speed) compute the same functions as SAM's conv patch
    embedding and as conv 1x1 + pixel shuffle + bilinear interpolation, gradients included."""
    import torch.nn.functional as F

    from masksam.model.mask_decoder import MaskUpsampler

    torch.manual_seed(0)
    up = MaskUpsampler(2)
    torch.nn.init.normal_(up.out.weight, std=0.2)
    torch.nn.init.normal_(up.out.bias, std=0.2)
    low = torch.randn(2 * 3 * 5, 1, 12, 10, requires_grad=True)
    img = torch.randn(6, 2, 48, 40)

    def reference(low: torch.Tensor) -> torch.Tensor:
        n, _, h, w = low.shape
        g = up.guide(img)
        gc = g.shape[1]
        hidden = F.gelu(low.reshape(-1, 5, 1, h, w) * up.gain.reshape(1, 1, gc, 1, 1) + g.unsqueeze(1))
        delta = F.pixel_shuffle(up.out(hidden.reshape(n, gc, h, w)), 4)
        return F.interpolate(low, scale_factor=4.0, mode="bilinear", align_corners=False) + delta

    fast, ref = up(low, img, 5), reference(low)
    assert fast.shape == (30, 1, 48, 40)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    g_fast = torch.autograd.grad(fast.square().sum(), low)[0]
    g_ref = torch.autograd.grad(ref.square().sum(), low)[0]
    torch.testing.assert_close(g_fast, g_ref, atol=1e-4, rtol=1e-4)

    enc = _tiny().image_encoder
    x = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(enc._patch_embed(x), enc.patch_embed(x), atol=1e-5, rtol=1e-5)


def test_prompt_generator_mask_branch_learns_from_its_own_loss_only():
    """Decoder-side losses reach the prompt generator's token/box heads but not its trunk and
    mask branch (they overwhelmed the auxiliary mask loss); the aux masks' own loss does."""
    m = _tiny()
    _randomise_zero_inits(m)
    pg = m.prompt_generator
    trunk = {n for n, _ in pg.named_parameters() if n.startswith(("bottom.", "fuse.", "input_block.", "pixel_embed.", "mask_embed."))}
    heads = {n for n, _ in pg.named_parameters() if n.startswith(("token_head.", "box_head.", "pool_proj."))}
    out = m(torch.randn(1, 1, 4, 64, 64))
    (out["pred_logits"].square().sum() + out["pred_masks"].square().mean() + out["aux_boxes"].sum()).backward(retain_graph=True)
    grads = {n: p.grad for n, p in pg.named_parameters()}
    assert all(grads[n] is None or grads[n].abs().sum() == 0 for n in trunk)
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in heads)
    pg.zero_grad(set_to_none=True)
    out["aux_masks"].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pg.named_parameters() if n in trunk)
