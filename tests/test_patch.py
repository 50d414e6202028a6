"""vitkern.patch on real timm / torchvision models (pretrained=False) and T2T-style layers.

For each model: patched outputs and parameter gradients match the unpatched model (CPU path,
fp32, 1e-4 relative), weights are shared (same Parameter objects), flags and hooks carry over,
state_dicts load both ways strictly, and unpatch restores bit-identical outputs. The Triton path
runs under TRITON_INTERPRET=1 on reduced models. Budget: well under a minute on one core.
"""
import copy

import pytest
import torch
from torch import nn

import vitkern
from vitkern.patch import PatchError, PatchReport, is_patched, patch, unpatch
from vitkern.reference.performer import TokenPerformer as ReferenceTokenPerformer
from vitkern.testing import rel_err

from conftest import requires_interpreter

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

TOL = 1e-4


def _randomize_zero_params(model: nn.Module) -> None:
    """timm/torchvision init some weights to zero (heads, biases, layer scales): give every
    parameter random values so a wrong or missing term shows in the outputs and gradients."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and p.dim() <= 1 and "norm" not in name and "logit_scale" not in name:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
            elif p.requires_grad and p.abs().sum() == 0:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def _grads(model: nn.Module, x: torch.Tensor, weight: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_model(model: nn.Module, x: torch.Tensor, expect: dict, backend: str = "auto"):
    """The full contract of patch on one model; returns the report."""
    _randomize_zero_params(model)
    first_norm = next(m for m in model.modules() if isinstance(m, nn.LayerNorm))
    first_norm.weight.requires_grad_(False)          # a frozen parameter must stay frozen
    reference = copy.deepcopy(model)
    params_before = [id(p) for p in model.parameters()]
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}
    keys_before = list(model.state_dict().keys())
    model.eval()
    with torch.no_grad():
        out_before = model(x)
    model.train()

    report = patch(model, backend=backend)
    assert report.counts() == expect, str(report)
    assert not report.left, str(report)
    assert is_patched(model)
    # weights shared, not copied; flags kept; state_dict keys unchanged (same order)
    assert [id(p) for p in model.parameters()] == params_before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags_before
    assert list(model.state_dict().keys()) == keys_before
    assert all(m.training for m in model.modules())

    # forward + backward against the unpatched copy, in eval mode (Swin's default drop_path is 0.1)
    model.eval()
    reference.eval()
    weight = torch.randn_like(out_before)
    out, grads = _grads(model, x, weight)
    ref_out, ref_grads = _grads(reference, x, weight)
    assert rel_err(out, ref_out) < TOL
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert rel_err(grads[name], g) < TOL, name

    # state_dict round trip both ways, strictly
    model.load_state_dict(reference.state_dict(), strict=True)
    reference.load_state_dict(model.state_dict(), strict=True)

    # train/eval flags follow the model; unpatch gives back the original objects, bit-identical
    assert rel_err(model(x), out_before) < TOL
    assert unpatch(model) == len(report)
    assert not is_patched(model)
    assert not any(type(m).__module__.startswith("vitkern") for m in model.modules())
    assert all(not m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), out_before)
    return report


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_small_patch16_224"])
def test_timm_vit(name):
    model = timm.create_model(name, pretrained=False)
    _check_model(model, torch.randn(1, 3, 224, 224), {"attention": 12})


def test_timm_swin():
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    report = _check_model(model, torch.randn(1, 3, 224, 224), {"window_attention": 12})
    assert all(e.replacement == "vitkern.nn.SwinTransformerBlock" for e in report.swapped)


def test_timm_swinv2():
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False)
    report = _check_model(model, torch.randn(1, 3, 256, 256), {"window_attention": 12})
    assert all(e.replacement == "vitkern.nn.SwinTransformerV2Block" for e in report.swapped)


def _small_torchvision_vit(**kw):
    from torchvision.models.vision_transformer import VisionTransformer
    cfg = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
               num_classes=10)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def test_torchvision_vit():
    # vit_b_16's classes (EncoderBlock on nn.MultiheadAttention) at a reduced size.
    model = _small_torchvision_vit()
    report = _check_model(model, torch.randn(2, 3, 32, 32), {"attention": 2})
    assert report.swapped[0].path == "encoder.layers.encoder_layer_0.self_attention"


class TokenPerformerT2T(ReferenceTokenPerformer):
    """T2T-ViT's Token_performer as users have it: the layer plus its ``prm_exp`` method."""

    def prm_exp(self, x):
        xd = ((x * x).sum(dim=-1, keepdim=True)).repeat(1, 1, self.m) / 2
        wtx = torch.einsum("bti,mi->btm", x.float(), self.w)
        return torch.exp(wtx - xd) / self.m ** 0.5


class TinyT2T(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention1 = TokenPerformerT2T(dim=27, in_dim=16, kernel_ratio=0.5, dp1=0.0, dp2=0.0)
        self.attention2 = TokenPerformerT2T(dim=16, in_dim=16, kernel_ratio=0.5, dp1=0.0, dp2=0.0)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.attention2(self.attention1(x)))


def test_token_performer_by_structure():
    model = TinyT2T()
    report = _check_model(model, 0.5 * torch.randn(2, 40, 27), {"performer": 2})
    assert {e.path for e in report.swapped} == {"attention1", "attention2"}
    # the frozen random matrix is the same object and stays frozen
    model2 = TinyT2T()
    w = model2.attention1.w
    patch(model2)
    assert model2.attention1.w is w and not w.requires_grad


def test_hooks_move_and_warnings():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    calls = []
    handle = model.blocks[0].attn.register_forward_hook(lambda m, i, o: calls.append(type(m).__module__))
    model.blocks[1].attn.attn_drop.register_forward_hook(lambda m, i, o: None)
    report = patch(model)
    assert any("blocks.1.attn.attn_drop" in w for w in report.warnings), report.warnings
    model(torch.randn(1, 3, 32, 32))
    assert calls == ["vitkern.nn.attention"]
    handle.remove()   # a handle taken before patching still removes the hook
    model(torch.randn(1, 3, 32, 32))
    assert len(calls) == 1


def test_dtype_change_while_patched_then_unpatch():
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64,
                              window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4)).eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    patch(model)
    model.double()
    with torch.no_grad():
        patched = model(x)
    unpatch(model)
    # the original modules follow the move: their own buffers (shift masks, indices) and params
    assert all(b.dtype in (torch.float64, torch.int64) for b in model.buffers())
    with torch.no_grad():
        assert rel_err(model(x), patched) < 1e-10


def test_report_contents_and_switches():
    model = _small_torchvision_vit()
    extra = nn.MultiheadAttention(64, 4)          # not inside an EncoderBlock
    model.add_module("extra_attention", extra)
    report = patch(model, attention=True)
    assert isinstance(report, PatchReport) and len(report) == 2
    assert [e.path for e in report.left] == ["extra_attention"]
    assert "EncoderBlock" in report.left[0].reason
    text = str(report)
    assert "2 swapped, 1 left" in text and "extra_attention" in text
    assert "nn.MultiheadAttention -> vitkern.nn.MultiheadAttention" in text
    unpatch(model)

    report = patch(model, attention=False)
    assert len(report) == 0 and len(report.skipped) == 3
    assert all(e.reason == "attention=False" for e in report.skipped)
    assert not is_patched(model)

    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64,
                             window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4))
    report = patch(swin, window_attention=False)
    assert len(report) == 0 and len(report.skipped) == 4   # blocks only, not their attention again


def test_strict_raises_and_leaves_model_untouched():
    model = _small_torchvision_vit()
    blk = model.encoder.layers[1]
    blk.self_attention = nn.MultiheadAttention(64, 4, batch_first=True, add_bias_kv=True)
    before = [type(m) for m in model.modules()]
    with pytest.raises(PatchError, match="add_bias_kv"):
        patch(model, strict=True)
    assert [type(m) for m in model.modules()] == before and not is_patched(model)
    report = patch(model)              # non-strict: the supported layer is swapped, the other left
    assert len(report) == 1 and "add_bias_kv" in report.left[0].reason

    class MyAttention(timm.layers.Attention):
        pass
    holder = nn.Sequential(MyAttention(32, num_heads=2))
    report = patch(holder)
    assert len(report) == 0 and "subclass" in report.left[0].reason
    with pytest.raises(PatchError, match="subclass"):
        patch(holder, strict=True)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        patch("not a model")
    with pytest.raises(TypeError, match="strict"):
        patch(nn.Linear(2, 2), strict=1)
    with pytest.raises(ValueError, match="backend"):
        patch(nn.Linear(2, 2), backend="gpu")
    with pytest.raises(TypeError, match="model"):
        unpatch(None)


def test_package_level_spelling():
    model = _small_torchvision_vit(num_layers=1)
    assert len(vitkern.patch(model)) == 1
    again = vitkern.patch(model)                     # nothing left to swap, nothing reported
    assert len(again) == 0 and not again.left
    assert vitkern.unpatch(model) == 1


@requires_interpreter
@pytest.mark.parametrize("kind", ["vit", "torchvision", "swin", "swinv2", "t2t"])
def test_triton_path_interpreter(kind):
    """Reduced models with backend='triton': the Triton kernels (forward and backward) run in the
    interpreter on CPU tensors and must match the unpatched model in fp32."""
    torch.manual_seed(0)
    if kind == "vit":
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=24, patch_size=8,
                                  embed_dim=48, depth=1, num_heads=2)        # head_dim 24, N = 10
        x = torch.randn(1, 3, 24, 24)
    elif kind == "swin":
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=24,
                                  patch_size=4, window_size=4, embed_dim=32, depths=(2,), num_heads=(2,))
        x = torch.randn(1, 3, 24, 24)                                     # 6x6 tokens: padded windows
    elif kind == "swinv2":
        model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=32,
                                  patch_size=4, window_size=4, embed_dim=32, depths=(2,), num_heads=(2,))
        x = torch.randn(1, 3, 32, 32)                                     # 8x8 tokens, shift 2
    elif kind == "torchvision":
        model = _small_torchvision_vit(num_layers=1)
        x = torch.randn(1, 3, 32, 32)
    else:
        model = TinyT2T()
        x = 0.5 * torch.randn(1, 20, 27)
    _randomize_zero_params(model)
    reference = copy.deepcopy(model).eval()
    model.eval()
    report = patch(model, backend="triton", strict=True)
    assert len(report) > 0
    assert all(getattr(m, "backend", "triton") == "triton" for m in model.modules()
               if type(m).__module__.startswith("vitkern.nn"))
    launched = []
    from triton.runtime.interpreter import InterpretedFunction
    original_run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return original_run(self, *args, **kwargs)
    InterpretedFunction.run = counting_run
    weight = torch.randn(reference(x).shape)
    try:
        out, grads = _grads(model, x, weight)
    finally:
        InterpretedFunction.run = original_run
    assert launched, "no Triton kernel ran"
    ref_out, ref_grads = _grads(reference, x, weight)
    assert rel_err(out, ref_out) < 1e-5
    for name, g in ref_grads.items():
        assert rel_err(grads[name], g) < TOL, name


def test_qk_norm_deepcopy_and_pickle():
    import io
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              qk_norm=True).eval()
    _randomize_zero_params(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    assert patch(model, strict=True).counts() == {"attention": 2}
    with torch.no_grad():
        assert rel_err(model(x), before) < TOL
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (twin, loaded):
        assert unpatch(m) == 2 and type(m.blocks[0].attn) is timm.layers.Attention
        with torch.no_grad():
            assert torch.equal(m(x), before)


def test_patched_models_without_extension(monkeypatch):
    """Without vitkern._C the replacements run the native PyTorch composition: same outputs."""
    import vitkern._backend
    monkeypatch.setattr(vitkern._backend, "has_cpu_op", lambda name: False)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=48, window_size=4,
                             embed_dim=24, depths=(2, 2), num_heads=(2, 4)).eval()
    holder = nn.ModuleDict({"swin": swin, "t2t": TinyT2T().eval()})
    _randomize_zero_params(holder)
    reference = copy.deepcopy(holder)
    assert patch(holder, strict=True).counts() == {"window_attention": 4, "performer": 2}
    x, tokens = torch.randn(1, 3, 48, 48), 0.5 * torch.randn(2, 30, 27)
    with torch.no_grad():
        assert rel_err(holder["swin"](x), reference["swin"](x)) < TOL
        assert rel_err(holder["t2t"](tokens), reference["t2t"](tokens)) < TOL
