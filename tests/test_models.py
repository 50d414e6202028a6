"""vitkern.models: every builder builds, runs a batch, and carries the right state_dict.

timm names: timm's model (pretrained=False) state_dict loads strictly into the vitkern model and
both compute the same logits (CPU path, fp32, 1e-4 relative). T2T-ViT: the original repository's
state_dict names, and the same logits as an eager composition of the reference layers.
"""
import copy
import math

import pytest
import torch
from torch import nn

import vitkern.models as models
from vitkern.models.t2t_vit import T2TViT, sinusoid_table
from vitkern.reference.attention import Attention as ReferenceAttention
from vitkern.reference.performer import TokenPerformer as ReferenceTokenPerformer
from vitkern.testing import rel_err

timm = pytest.importorskip("timm")

TIMM_NAMES = {
    "vit_tiny_patch16_224": 224, "vit_small_patch16_224": 224, "vit_base_patch16_224": 224,
    "swin_tiny_patch4_window7_224": 224, "swin_small_patch4_window7_224": 224,
    "swin_base_patch4_window7_224": 224, "swinv2_tiny_window8_256": 256,
}
REPLACED = ("Attention", "SwinTransformerBlock", "SwinTransformerV2Block", "WindowAttention")


def test_list_models_and_errors():
    names = models.list_models()
    for name in list(TIMM_NAMES) + ["t2t_vit_7", "t2t_vit_10", "t2t_vit_12", "t2t_vit_14"]:
        assert name in names
    assert models.list_models("swin*") == sorted(n for n in names if n.startswith("swin"))
    with pytest.raises(ValueError, match="unknown name 'vit_giant'"):
        models.create_model("vit_giant")
    with pytest.raises(TypeError, match="name"):
        models.create_model(7)
    with pytest.raises(ValueError, match="pretrained"):
        models.create_model("t2t_vit_7", pretrained=True)
    with pytest.raises(ValueError, match="img_size"):
        models.create_model("t2t_vit_7", img_size=100)


@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_timm_builder_loads_timm_state_dict(name):
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():       # zero-initialised heads would hide differences in the logits
        reference.get_classifier().weight.normal_(0, 0.02)
    model = models.create_model(name).eval()
    leftovers = [n for n, m in model.named_modules()
                 if type(m).__module__.startswith("timm") and type(m).__name__ in REPLACED]
    assert not leftovers, leftovers
    model.load_state_dict(reference.state_dict(), strict=True)
    size = TIMM_NAMES[name]
    x = torch.randn(2 if "tiny" in name else 1, 3, size, size)
    with torch.no_grad():
        assert rel_err(model(x), reference(x)) < 1e-4


def test_timm_builder_keywords_reach_timm():
    model = models.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, in_chans=1,
                                window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=3)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def _t2t_expected_keys(depth: int) -> set:
    keys = {"cls_token", "pos_embed", "tokens_to_token.project.weight", "tokens_to_token.project.bias",
            "norm.weight", "norm.bias", "head.weight", "head.bias"}
    for a in ("attention1", "attention2"):
        keys.add(f"tokens_to_token.{a}.w")
        for layer in ("kqv", "proj", "norm1", "norm2", "mlp.0", "mlp.2"):
            keys |= {f"tokens_to_token.{a}.{layer}.weight", f"tokens_to_token.{a}.{layer}.bias"}
    for i in range(depth):
        keys.add(f"blocks.{i}.attn.qkv.weight")        # qkv_bias=False in T2T-ViT
        for layer in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"}
    return keys


@pytest.mark.parametrize("name,depth,dim", [("t2t_vit_7", 7, 256), ("t2t_vit_10", 10, 256),
                                            ("t2t_vit_12", 12, 256), ("t2t_vit_14", 14, 384)])
def test_t2t_state_dict_names(name, depth, dim):
    model = models.create_model(name)
    sd = model.state_dict()
    assert set(sd) == _t2t_expected_keys(depth)
    assert sd["pos_embed"].shape == (1, 197, dim) and not model.pos_embed.requires_grad
    assert sd["tokens_to_token.attention1.kqv.weight"].shape == (3 * 64, 3 * 7 * 7)
    assert sd["tokens_to_token.attention2.kqv.weight"].shape == (3 * 64, 64 * 3 * 3)
    assert sd["tokens_to_token.attention1.w"].shape == (32, 64)
    assert sd["tokens_to_token.project.weight"].shape == (dim, 64 * 9)
    assert type(model.tokens_to_token.attention1).__module__ == "vitkern.nn.performer"
    assert type(model.blocks[0].attn).__module__ == "vitkern.nn.attention"
    # checkpoint round trip into a fresh model
    models.create_model(name).load_state_dict(sd, strict=True)


def test_sinusoid_table_is_t2t_formula():
    table = sinusoid_table(50, 12)
    for pos in (0, 1, 7, 49):
        for j in range(12):
            angle = pos / 10000 ** (2 * (j // 2) / 12)
            want = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert abs(table[0, pos, j].item() - want) < 1e-6


def _eager_t2t(model: T2TViT) -> nn.Module:
    """The same network with the reference (eager) layers in place of the vitkern ones."""
    eager = copy.deepcopy(model)
    t2t = eager.tokens_to_token
    for name in ("attention1", "attention2"):
        old = getattr(t2t, name)
        ref = ReferenceTokenPerformer(old.kqv.in_features, old.emb, dp1=0.0, dp2=0.0)
        ref.load_state_dict(old.state_dict())
        setattr(t2t, name, ref)
    for blk in eager.blocks:
        ref = ReferenceAttention(blk.attn.qkv.in_features, num_heads=blk.attn.num_heads)
        ref.load_state_dict(blk.attn.state_dict())
        ref.scale = blk.attn.scale
        blk.attn = ref
    return eager


@pytest.mark.parametrize("img_size,qk_scale", [(224, None), (64, 256 ** -0.5)])
def test_t2t_matches_eager_composition(img_size, qk_scale):
    torch.manual_seed(0)
    model = models.create_model("t2t_vit_7", img_size=img_size, qk_scale=qk_scale, num_classes=10).eval()
    assert model.blocks[0].attn.scale == (qk_scale or 64 ** -0.5)
    eager = _eager_t2t(model).eval()
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 10)
        assert rel_err(out, eager(x)) < 1e-4
