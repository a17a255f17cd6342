"""The paper's network pieces (issue 10): every MaskSAMConfig switch builds, trains a step at
tiny size, starts as the loaded SAM, and keeps the output contract and the ONNX graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from masksam.model import MaskSAMConfig, build_masksam, parameter_report
from masksam.model.adapters import HiddenDepthConvAdapter, SliceMLPAdapter
from masksam.model.params import is_new_parameter
from masksam.model.prompt_generator import adaptive_pool_planes
from test_model_network import _randomise_zero_inits, _tiny, assert_onnx_matches_eager  # shared builders

# every switch at its paper value (configs/paper_*.yaml); the defaults are the demo's
PAPER = dict(
    encoder_adapter="paper", pos_embed="crop", stem="conv", prompt_generator="full", mask_prompt="binary",
    prompt_temporal_embedding=True, decoder_adapters="paper", mask_upsampler="learned3d",
)
SWITCHES = [pytest.param({k: v}, id=f"{k}={v}") for k, v in PAPER.items()] + [
    pytest.param(PAPER, id="all-paper"),
    pytest.param(dict(PAPER, patch_size=8), id="all-paper-patch8"),
    pytest.param(dict(PAPER, use_depth_conv_adapter=False), id="paper-no-conv-adapters"),
    pytest.param(dict(PAPER, use_depth_mlp_adapter=False), id="paper-no-mlp-adapters"),
    pytest.param(dict(PAPER, use_aux_boxes=False, use_aux_class_tokens=False), id="paper-no-boxes-tokens"),
]


def test_defaults_are_the_demo_and_unknown_values_are_refused():
    cfg = MaskSAMConfig()
    assert (cfg.encoder_adapter, cfg.pos_embed, cfg.stem, cfg.prompt_generator, cfg.mask_prompt,
            cfg.prompt_temporal_embedding, cfg.decoder_adapters, cfg.mask_upsampler) == (
        "serial", "interpolate", "linear", "light", "logits", False, "light", "guided")
    for key in PAPER:
        if isinstance(PAPER[key], str):
            with pytest.raises(ValueError, match=key):
                MaskSAMConfig(**{key: "nope"})
    with pytest.raises(ValueError, match="adapter_mlp_scale"):
        MaskSAMConfig(adapter_mlp_scale=-1.0)


@pytest.mark.parametrize("switches", SWITCHES)
def test_each_switch_builds_and_trains_a_step(switches):
    m = _tiny(**switches)
    _randomise_zero_inits(m)
    x = torch.randn(2, 1, 4, 64, 64)
    out = m(x)
    assert out["pred_logits"].shape == (2, 4, 4, 4)
    assert out["pred_masks"].shape == (2, 4, 4, 64, 64)
    assert out["aux_masks"].shape[:3] == (2, 4, 4)
    b = out["aux_boxes"]
    assert b.shape == (2, 4, 4, 4)
    assert (b >= 0).all() and (b <= 1).all() and (b[..., 2] >= b[..., 0]).all() and (b[..., 3] >= b[..., 1]).all()
    loss = out["pred_logits"].square().mean() + out["pred_masks"].mean() + out["aux_masks"].mean() + b.sum()
    loss.backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable, sorted(trainable - with_grad)[:10]
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    opt.step()
    assert all(torch.isfinite(v).all() for v in m(x).values())


def test_paper_aux_masks_are_full_resolution_and_the_light_ones_quarter():
    assert _tiny(prompt_generator="full")(torch.randn(1, 1, 4, 64, 64))["aux_masks"].shape == (1, 4, 4, 64, 64)
    assert _tiny()(torch.randn(1, 1, 4, 64, 64))["aux_masks"].shape == (1, 4, 4, 16, 16)


def test_freeze_sam_trains_exactly_the_additions_with_every_paper_piece():
    m = _tiny(**PAPER, freeze_sam=True)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in m.named_parameters() if is_new_parameter(n)}
    for part in ("image_encoder.blocks.0.attn_adapter.", "image_encoder.blocks.0.mlp_adapter.", "stem.",
                 "prompt_encoder.temporal_embed", "mask_decoder.block_adapters.1.image_to_token.",
                 "mask_decoder.block_adapters.0.mlp.", "mask_decoder.final_adapter.", "mask_upsampler.net."):
        assert any(n.startswith(part) for n in names), part
    assert not any(".adapter." in n for n in names)  # the serial adapter is replaced, not added
    rep = parameter_report(m)
    assert rep["trainable"] == rep["new"]


def test_paper_decoder_has_seven_token_adapters_and_two_image_adapters():
    dec = _tiny(decoder_adapters="paper").mask_decoder
    tok = [n for n, mod in dec.named_modules() if isinstance(mod, SliceMLPAdapter)]
    img = [n for n, mod in dec.named_modules() if isinstance(mod, HiddenDepthConvAdapter)]
    assert len(tok) == 7 and len(img) == 2
    assert dec.image_adapter is None and dec.token_adapters is None


def test_all_adapters_and_temporal_embeddings_are_identity_at_start():
    """Zero-initialised up-projections and temporal tables: with every paper adapter on, the
    network computes what it computes with them off (the loaded SAM, unchanged at step 0)."""
    on = _tiny(**PAPER)
    off = _tiny(**dict(PAPER, prompt_temporal_embedding=False), use_depth_conv_adapter=False,
                use_depth_mlp_adapter=False, use_temporal_embedding=False)
    sd = {k: v for k, v in on.state_dict().items() if k in off.state_dict()}
    off.load_state_dict(sd, strict=True)
    x = torch.randn(1, 1, 4, 64, 64)
    with torch.no_grad():
        a, b = on(x), off(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
    _randomise_zero_inits(on)
    with torch.no_grad():
        assert not torch.allclose(on(x)["pred_logits"], b["pred_logits"], atol=1e-4)


def test_paper_decoder_batched_equals_reference_loop():
    m = _tiny(**PAPER)
    _randomise_zero_inits(m)
    x = torch.randn(2, 1, 4, 64, 64)
    with torch.no_grad():
        fast = m(x)
        m.cfg.decoder_mode = "loop"
        ref = m(x)
    for k in fast:
        torch.testing.assert_close(fast[k], ref[k], atol=1e-5, rtol=1e-4)


def test_hidden_depth_conv_adapter_mixes_neighbouring_slices_of_one_query_only():
    torch.manual_seed(0)
    ad = HiddenDepthConvAdapter(16)
    torch.nn.init.normal_(ad.up.weight)
    x = torch.randn(5 * 2, 6, 6, 16)  # one slab, T=5 slices x Q=2 queries, 6x6 tokens
    y0 = ad(x, depth=5, num_queries=2)
    x2 = x.clone()
    x2[0, 3, 3] += 1.0  # slice 0, query 0
    d = (ad(x2, depth=5, num_queries=2) - y0).abs().sum(-1).reshape(5, 2, 6, 6)
    assert d[0, 0, 3, 3] > 0 and d[1, 0, 3, 3] > 0 and d[0, 0, 2, 2] > 0  # itself, next slice, neighbours
    assert d[:, 1].max() == 0 and d[2:].max() == 0 and d[0, 0, 0, 0] == 0  # other query, 2 slices away, far


def test_slice_mlp_adapter_acts_along_slices_per_query_and_is_tied_to_its_depth():
    torch.manual_seed(0)
    ad = SliceMLPAdapter(8, depth=4)
    torch.nn.init.normal_(ad.up.weight)
    tok = torch.randn(4 * 3, 5, 8)  # B=1, T=4, Q=3, N=5
    y0 = ad(tok, depth=4, num_queries=3)
    tok2 = tok.clone()
    tok2[0, 2] += 1.0  # slice 0, query 0, token 2
    d = (ad(tok2, depth=4, num_queries=3) - y0).abs().sum(-1).reshape(4, 3, 5)
    assert d[3, 0, 2] > 0  # a full MLP over T: the last slice hears the first
    assert d[:, 1:].max() == 0 and d[:, 0, 0].max() == 0
    with pytest.raises(ValueError, match="slabs of 4 slices"):
        ad(torch.randn(3 * 3, 5, 8), depth=3, num_queries=3)


def test_prompt_temporal_embedding_gives_each_slice_its_own_dense_pe():
    m = _tiny(prompt_temporal_embedding=True)
    pe = m.prompt_encoder
    assert pe.temporal_embed.shape == (4, 64, 4, 4) and pe.temporal_embed.abs().sum() == 0
    with torch.no_grad():
        pe.temporal_embed.normal_()
    dense = pe.slab_dense_pe(2, 4)
    assert dense.shape == (8, 64, 4, 4)
    torch.testing.assert_close(dense[5] - pe.get_dense_pe()[0], pe.temporal_embed[1])
    assert pe.slab_dense_pe(1, 3).shape == (3, 64, 4, 4)  # another depth: resampled table
    assert _tiny().prompt_encoder.slab_dense_pe(2, 4).shape == (1, 64, 4, 4)


@pytest.mark.parametrize("shape,size", [((2, 3, 2, 8, 8), 2), ((1, 2, 3, 4, 6), 16), ((1, 1, 2, 12, 10), 8)])
def test_adaptive_pool_planes_equals_torch_adaptive_pooling(shape, size):
    x = torch.randn(shape)
    ref = F.adaptive_avg_pool3d(x, (shape[2], size, size))
    torch.testing.assert_close(adaptive_pool_planes(x, size), ref, atol=1e-6, rtol=1e-5)


def test_conv_stem_and_learned_upsampler_shapes():
    m = _tiny(stem="conv", mask_upsampler="learned3d", in_channels=2)
    assert m.stem(torch.randn(1, 2, 4, 64, 64)).shape == (1, 3, 4, 64, 64)
    low = torch.randn(1 * 4 * 4, 1, 16, 16)
    assert m.mask_upsampler(low, None, 4, depth=4).shape == (16, 1, 64, 64)
    with pytest.raises(ValueError, match="4 queries"):
        m.mask_upsampler(torch.randn(12, 1, 16, 16), None, 3, depth=4)


def test_binary_mask_prompt_feeds_sam_a_zero_one_mask():
    m = _tiny(prompt_generator="full", mask_prompt="binary")
    seen = {}
    def grab(mod, inp, out) -> None:
        seen["in"] = inp[0]

    hook = m.prompt_encoder.mask_downscaling.register_forward_hook(grab)
    m(torch.randn(1, 1, 4, 64, 64))
    hook.remove()
    assert seen["in"].shape[-2:] == (16, 16)  # SAM's mask input: 4x the 4x4 token grid
    assert set(seen["in"].unique().tolist()) <= {0.0, 1.0}


def test_paper_state_file_roundtrip(tmp_path):
    from masksam.model import load_masksam_state, read_masksam_config, save_masksam_state

    m = _tiny(**PAPER)
    _randomise_zero_inits(m)
    path = tmp_path / "w.safetensors"
    save_masksam_state(m, path)
    cfg = read_masksam_config(path)
    assert cfg == m.cfg and cfg.prompt_generator == "full"
    m2 = build_masksam(cfg)
    load_masksam_state(m2, path)
    x = torch.randn(1, 1, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m.class_probs(x), m2.class_probs(x))


def test_paper_class_probs_exports_to_onnx_and_matches(tmp_path):
    assert_onnx_matches_eager(_tiny(**PAPER, img_size=32, slab_depth=2, num_queries=2).eval(), tmp_path)


def test_parameter_report_splits_the_additions_by_role():
    """Every MaskSAM addition falls in one named role (the dry-run's report), SAM's own weights
    in ``sam``; the roles add up to the totals."""
    from masksam.model.params import GROUPS, format_parameter_report, parameter_group

    m = _tiny(**PAPER, freeze_sam=True)
    rep = parameter_report(m)
    assert set(rep["groups"]) == {g for g, _ in GROUPS} | {"sam"}
    for name, _ in m.named_parameters():
        assert (parameter_group(name) != "sam") == is_new_parameter(name), name
    assert sum(d["total"] for d in rep["groups"].values()) == rep["total"]
    assert sum(d["trainable"] for d in rep["groups"].values()) == rep["trainable"]
    assert rep["groups"]["sam"]["trainable"] == 0 and rep["groups"]["sam"]["total"] > 0
    for role in ("stem", "encoder_adapters", "temporal_embeddings", "prompt_generator", "decoder_additions",
                 "upsampler", "classifier_head"):
        assert rep["groups"][role]["trainable"] > 0, role
        assert role in format_parameter_report(rep)
