"""SAM checkpoints written by segment-anything's own builders load into MaskSAM, strictly."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from segment_anything import sam_model_registry
from segment_anything.build_sam import _build_sam
from segment_anything.modeling import ImageEncoderViT

from masksam.model import WeightsError, MaskSAMConfig, build_masksam, parameter_report
from masksam.model.build import VARIANTS
from masksam.model.weights import adapt_position_tables, infer_sam_variant


@pytest.fixture(scope="module")
def vit_b_ckpt(tmp_path_factory):
    """A vit_b checkpoint as segment-anything writes it (random weights, non-zero rel-pos)."""
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    with torch.no_grad():
        for n, p in sam.named_parameters():
            if "rel_pos" in n or n.endswith("pos_embed"):
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(sam.state_dict(), path)
    return path, sam.state_dict()


@pytest.mark.parametrize("size", [256, 512, 1024])
def test_vit_b_checkpoint_loads_at_sizes(vit_b_ckpt, size):
    path, sd = vit_b_ckpt
    cfg = MaskSAMConfig(variant="vit_b", img_size=size, slab_depth=2, num_classes=3, num_queries=2)
    m = build_masksam(cfg, sam_weights=str(path))
    own = m.state_dict()
    g = size // 16
    assert own["image_encoder.pos_embed"].shape == (1, g, g, 768)
    assert own["image_encoder.blocks.2.attn.rel_pos_h"].shape == (2 * g - 1, 64)  # global block
    assert own["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 64)  # windowed: unchanged
    torch.testing.assert_close(own["image_encoder.blocks.0.attn.rel_pos_h"], sd["image_encoder.blocks.0.attn.rel_pos_h"])
    torch.testing.assert_close(own["mask_decoder.transformer.layers.0.mlp.lin1.weight"],
                               sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"])
    if size == 1024:
        torch.testing.assert_close(own["image_encoder.pos_embed"], sd["image_encoder.pos_embed"])
    rep = parameter_report(m)
    assert rep["trainable"] == rep["new"]  # freeze_sam: only MaskSAM's additions train


def test_report_lists_fresh_parameters(vit_b_ckpt):
    from masksam.model.weights import load_sam_weights

    path, _ = vit_b_ckpt
    m = build_masksam(MaskSAMConfig(variant="vit_b", img_size=256, slab_depth=2, num_classes=3, num_queries=2))
    rep = load_sam_weights(m, path)
    assert not rep.missing and not rep.unexpected and not rep.mismatched
    assert "mask_decoder.cls_head.weight" in rep.new_parameters
    assert "image_encoder.blocks.0.adapter.up.weight" in rep.new_parameters
    assert set(rep.adapted) == {"image_encoder.pos_embed"} | {
        f"image_encoder.blocks.{i}.attn.rel_pos_{a}" for i in (2, 5, 8, 11) for a in "hw"
    }


def test_wrong_variant_and_corrupt_checkpoints_name_the_keys(vit_b_ckpt, tmp_path):
    path, sd = vit_b_ckpt
    cfg = MaskSAMConfig(variant="vit_b", img_size=256, slab_depth=2, num_classes=3, num_queries=2)
    # a shallower SAM written by segment-anything's own builder: missing blocks 6..11
    torch.manual_seed(0)
    small = _build_sam(768, 6, 12, [2, 5])
    p_small = tmp_path / "sam_small.pth"
    torch.save(small.state_dict(), p_small)
    with pytest.raises(WeightsError, match=r"missing keys \(\d+\): image_encoder\.blocks\.6\.") as e:
        build_masksam(cfg, sam_weights=str(p_small))
    assert "image_encoder.blocks.11.mlp.lin2.bias" in e.value.missing
    # extra / renamed keys
    bad = dict(sd)
    bad["image_encoder.blocks.0.attn.qkv.weigth"] = bad.pop("image_encoder.blocks.0.attn.qkv.weight")
    p_bad = tmp_path / "renamed.pth"
    torch.save(bad, p_bad)
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): image_encoder\.blocks\.0\.attn\.qkv\.weigth"):
        build_masksam(cfg, sam_weights=str(p_bad))
    # truncated file
    p_trunc = tmp_path / "trunc.pth"
    p_trunc.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(WeightsError, match="cannot be read"):
        build_masksam(cfg, sam_weights=str(p_trunc))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_masksam(cfg, sam_weights=str(tmp_path / "nope.pth"))
    # allow_missing loads what fits and reports
    m = build_masksam(cfg, sam_weights=str(p_small), allow_missing=True)
    assert m is not None


def test_infer_variant_hint():
    sd = {"image_encoder.pos_embed": torch.zeros(1, 64, 64, 1024)}
    sd.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(24)})
    assert infer_sam_variant(sd) == "vit_l"


@pytest.mark.parametrize(
    "variant,size,style",
    [("tiny", 64, "serial"), ("tiny", 64, "paper"), pytest.param("vit_b", 256, "serial", marks=pytest.mark.slow),
     pytest.param("vit_b", 256, "paper", marks=pytest.mark.slow)],
)
def test_adapted_encoder_equals_segment_anything_encoder(variant, size, style):
    """With every adapter on (``serial``: one per block; ``paper``: the attention-branch and
    MLP-parallel adapters) and temporal embeddings at their initial values, our encoder's
    output equals segment-anything's ImageEncoderViT on the same weights, slice by slice."""
    torch.manual_seed(0)
    spec = VARIANTS[variant]
    ref = ImageEncoderViT(
        img_size=size, embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), patch_size=16,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=spec.global_attn_indexes,
        window_size=spec.window_size, out_chans=spec.prompt_dim,
    ).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "rel_pos" in n or n == "pos_embed":
                p.normal_(0, 0.02)
    m = build_masksam(MaskSAMConfig(variant=variant, img_size=size, slab_depth=2, num_classes=3, num_queries=2,
                                    encoder_adapter=style))
    n_adapters = sum(1 for n, _ in m.image_encoder.named_modules() if n.endswith("adapter"))
    assert n_adapters == spec.depth * (2 if style == "paper" else 1)
    result = m.image_encoder.load_state_dict(ref.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all("adapter" in k or k == "temporal_embed" for k in result.missing_keys)
    x = torch.randn(2, 3, size, size)  # T=2 slices of one slab
    with torch.no_grad():
        ours, feats = m.image_encoder(x, 2)
        theirs = ref(x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert len(feats) == len(spec.global_attn_indexes)


def test_pos_embed_crop_keeps_the_top_left_of_sams_table(vit_b_ckpt):
    """``pos_embed: crop`` (the paper's encoder) loads SAM's 64x64 table cropped, not resampled;
    the global blocks' relative tables are resampled either way."""
    path, sd = vit_b_ckpt
    cfg = MaskSAMConfig(variant="vit_b", img_size=256, slab_depth=2, num_classes=3, num_queries=2, pos_embed="crop")
    m = build_masksam(cfg, sam_weights=str(path))
    own = m.state_dict()
    torch.testing.assert_close(own["image_encoder.pos_embed"], sd["image_encoder.pos_embed"][:, :16, :16])
    assert own["image_encoder.blocks.2.attn.rel_pos_h"].shape == (31, 64)
    with pytest.raises(WeightsError, match="pos_embed: crop needs a token grid of at most 64x64"):
        adapt_position_tables({"image_encoder.pos_embed": torch.randn(1, 64, 64, 2)}, 80, (), "crop")


def test_rel_pos_adaptation_shapes():
    sd = {"image_encoder.blocks.2.attn.rel_pos_h": torch.randn(127, 64), "image_encoder.pos_embed": torch.randn(1, 64, 64, 8)}
    out, changed = adapt_position_tables(sd, 16, (2,))
    assert out["image_encoder.blocks.2.attn.rel_pos_h"].shape == (31, 64)
    assert out["image_encoder.pos_embed"].shape == (1, 16, 16, 8)
    # a constant table stays constant under both interpolations
    const = {"image_encoder.pos_embed": torch.ones(1, 64, 64, 2)}
    torch.testing.assert_close(adapt_position_tables(const, 32, ())[0]["image_encoder.pos_embed"], torch.ones(1, 32, 32, 2))
    assert sorted(changed) == ["image_encoder.blocks.2.attn.rel_pos_h", "image_encoder.pos_embed"]


@pytest.mark.slow
def test_vit_b_forward_shapes(vit_b_ckpt):
    path, _ = vit_b_ckpt
    m = build_masksam(MaskSAMConfig(variant="vit_b", img_size=256, slab_depth=2, num_classes=3, num_queries=2),
                      sam_weights=str(path))
    with torch.no_grad():
        out = m(torch.randn(1, 1, 2, 256, 256))
    assert out["pred_logits"].shape == (1, 2, 2, 4)
    assert out["pred_masks"].shape == (1, 2, 2, 256, 256)
    assert out["aux_masks"].shape == (1, 2, 2, 64, 64)
    assert all(torch.isfinite(v).all() for v in out.values())
