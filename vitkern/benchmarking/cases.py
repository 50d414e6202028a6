"""Benchmark cases: the attention shapes of real models.

Built-in models (``--model vit_b16`` ...) come from the table of shapes that matter (one case per
distinct attention shape; Swin: one case per stage, the shifted block where the stage has one).
Any other name is built with ``timm.create_model(name, pretrained=False)`` (or a vitkern model
builder) and walked: forward hooks on its attention layers record the shapes they really see on
one batch-1 forward pass at the model's default input size.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch

OPS = ("attention", "window", "performer")


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape of one op. ``tokens`` is N (attention), H*W (window) or T (performer)."""
    op: str
    model: str
    label: str
    batch: int
    tokens: int
    dim: int                 # layer input width (performer: the token width entering the layer)
    num_heads: int
    head_dim: int
    resolution: Optional[Tuple[int, int]] = None   # window: (H, W)
    window: int = 0
    shift: int = 0
    cosine: bool = False                             # SwinV2 cosine attention + continuous bias
    features: int = 0                                # performer: random features m
    layers: int = 1                                  # layers of the model with this shape
    source: str = "builtin"

    @property
    def emb(self) -> int:
        return self.num_heads * self.head_dim

    def describe(self) -> str:
        if self.op == "attention":
            return f"B={self.batch} N={self.tokens} {self.num_heads}x{self.head_dim}"
        if self.op == "window":
            h, w = self.resolution
            v2 = " cos" if self.cosine else ""
            return (f"B={self.batch} {h}x{w} win{self.window} shift{self.shift} "
                    f"{self.num_heads}x{self.head_dim}{v2}")
        return f"B={self.batch} T={self.tokens} in{self.dim} D={self.head_dim} m={self.features}"

    def as_dict(self) -> Dict[str, object]:
        d = dataclasses.asdict(self)
        d["resolution"] = list(self.resolution) if self.resolution else None
        d["shape"] = self.describe()
        return d


# name -> (timm name or None, op, entries). Attention entries: (tokens, dim, heads, layers).
# Window entries: (resolution, dim, heads, window, shift, layers). Performer: (tokens, dim, emb, m).
_ATTENTION_MODELS = {
    "vit_s16": ("vit_small_patch16_224", [(197, 384, 6, 12)]),
    "vit_b16": ("vit_base_patch16_224", [(197, 768, 12, 12)]),
    "vit_l16": ("vit_large_patch16_224", [(197, 1024, 16, 24)]),
    "vit_b16_384": ("vit_base_patch16_384", [(577, 768, 12, 12)]),
    "deit_ti": ("deit_tiny_patch16_224", [(197, 192, 3, 12)]),
}
_WINDOW_MODELS = {
    # Swin-T @224: depths 2,2,6,2; window 7, shift 3; the last stage is one window (no shift)
    "swin_t": ("swin_tiny_patch4_window7_224", False,
               [(56, 96, 3, 7, 3, 2), (28, 192, 6, 7, 3, 2), (14, 384, 12, 7, 3, 6), (7, 768, 24, 7, 0, 2)]),
    # SwinV2-T @256: window 8, shift 4, cosine attention with continuous position bias
    "swinv2_t": ("swinv2_tiny_window8_256", True,
                 [(64, 96, 3, 8, 4, 2), (32, 192, 6, 8, 4, 2), (16, 384, 12, 8, 4, 6), (8, 768, 24, 8, 0, 2)]),
    # Swin-B @384: depths 2,2,18,2; window 12, shift 6
    "swin_b_384": ("swin_base_patch4_window12_384", False,
                   [(96, 128, 4, 12, 6, 2), (48, 256, 8, 12, 6, 2), (24, 512, 16, 12, 6, 18),
                    (12, 1024, 32, 12, 0, 2)]),
}
_PERFORMER_MODELS = {
    # T2T-ViT-14 tokens-to-token stages: Token_performer(dim=3*7*7, in_dim=64) on 56x56 tokens,
    # Token_performer(dim=64*3*3, in_dim=64) on 28x28 tokens; kernel_ratio 0.5 -> m = 32
    "t2t_vit_14": [(3136, 147, 64, 32), (784, 576, 64, 32)],
}
BUILTIN_MODELS = {**{k: "attention" for k in _ATTENTION_MODELS}, **{k: "window" for k in _WINDOW_MODELS},
                  **{k: "performer" for k in _PERFORMER_MODELS}}


def builtin_cases(model: str, batch: int) -> List[Case]:
    if model in _ATTENTION_MODELS:
        _, entries = _ATTENTION_MODELS[model]
        return [Case("attention", model, model, batch, n, dim, h, dim // h, layers=layers)
                for n, dim, h, layers in entries]
    if model in _WINDOW_MODELS:
        _, cosine, entries = _WINDOW_MODELS[model]
        return [Case("window", model, f"{model} s{i + 1}", batch, r * r, dim, h, dim // h, (r, r), win, sh,
                     cosine, layers=layers)
                for i, (r, dim, h, win, sh, layers) in enumerate(entries)]
    if model in _PERFORMER_MODELS:
        return [Case("performer", model, f"{model} t{i + 1}", batch, t, dim, 1, emb, features=m)
                for i, (t, dim, emb, m) in enumerate(_PERFORMER_MODELS[model])]
    raise KeyError(model)


def default_models(op: str) -> List[str]:
    ops = OPS if op == "all" else (op,)
    return [m for m, o in BUILTIN_MODELS.items() if o in ops]


def timm_name(model: str) -> Optional[str]:
    """The timm model behind a built-in name (None for T2T-ViT, which timm does not have)."""
    if model in _ATTENTION_MODELS:
        return _ATTENTION_MODELS[model][0]
    if model in _WINDOW_MODELS:
        return _WINDOW_MODELS[model][0]
    return None


def _build_model(name: str) -> torch.nn.Module:
    """A timm model by that name, else a ``vitkern.models`` builder (T2T-ViT lives only there)."""
    import timm
    if name in timm.list_models():
        return timm.create_model(name, pretrained=False)
    try:
        import vitkern.models as vm
        known = vm.list_models()
    except Exception:
        vm, known = None, []
    if name in known:
        return vm.create_model(name, pretrained=False)
    raise ValueError(f"--model: {name!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}), "
                     "a timm model name, nor a vitkern.models builder")


def _input_size(model: torch.nn.Module) -> Tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def _is_class(module, names: Sequence[str]) -> bool:
    return type(module).__name__ in names


def walk_model(name: str, batch: int, model: Optional[torch.nn.Module] = None) -> List[Case]:
    """Cases from the attention layers of a timm (or vitkern) model, deduplicated by shape."""
    model = model if model is not None else _build_model(name)
    model.eval()
    found: Dict[tuple, List] = {}

    def record(key, layer_case):
        if key in found:
            found[key][1] += 1
        else:
            found[key] = [layer_case, 1]

    def attention_hook(mod, args):
        x = args[0]
        B, N, C = x.shape
        key = ("attention", N, C, mod.num_heads, mod.head_dim)
        record(key, Case("attention", name, name, batch, N, C, mod.num_heads, mod.head_dim, source="model walk"))

    def swin_hook(block, args):
        x = args[0]
        _, H, W, C = x.shape
        win, sh = block.window_size, block.shift_size
        if win[0] != win[1] or sh[0] != sh[1]:
            return  # rectangular windows are not in the built-in benchmark set
        cosine = hasattr(block.attn, "logit_scale")
        key = ("window", H, W, C, block.attn.num_heads, win[0], sh[0], cosine)
        record(key, Case("window", name, name, batch, H * W, C, block.attn.num_heads, C // block.attn.num_heads,
                         (H, W), win[0], sh[0], cosine, source="model walk"))

    def performer_hook(mod, args):
        x = args[0]
        _, T, dim = x.shape
        key = ("performer", T, dim, mod.emb, mod.m)
        record(key, Case("performer", name, name, batch, T, dim, 1, mod.emb, features=mod.m, source="model walk"))

    hooks = []
    for mod in model.modules():
        if _is_class(mod, ("Attention",)) and hasattr(mod, "qkv") and hasattr(mod, "num_heads"):
            hooks.append(mod.register_forward_pre_hook(attention_hook))
        elif _is_class(mod, ("SwinTransformerBlock", "SwinTransformerV2Block")):
            hooks.append(mod.register_forward_pre_hook(swin_hook))
        elif _is_class(mod, ("TokenPerformer", "Token_performer")) and hasattr(mod, "m"):
            hooks.append(mod.register_forward_pre_hook(performer_hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, *_input_size(model)))
    finally:
        for h in hooks:
            h.remove()
    cases = []
    for (kind, *_), (c, layers) in found.items():
        label = c.label if kind == "attention" else f"{c.label} {c.describe().split(' ', 1)[1]}"
        cases.append(dataclasses.replace(c, layers=layers, label=label))
    return cases


def select_cases(op: str, models: Sequence[str], batch: int) -> List[Case]:
    """The cases for ``--op``/``--model``; an explicit model overrides the op filter only when
    the op is ``all``."""
    cases: List[Case] = []
    for m in models:
        cs = builtin_cases(m, batch) if m in BUILTIN_MODELS else walk_model(m, batch)
        if op != "all":
            cs = [c for c in cs if c.op == op]
        cases += cs
    return cases


def quick_cases(op: str, batch: int = 1) -> List[Case]:
    """Tiny shapes for ``--quick`` smoke runs: one per op, seconds in total."""
    tiny = [
        Case("attention", "tiny", "tiny attention", batch, 17, 64, 2, 32),
        Case("window", "tiny", "tiny window", batch, 10 * 10, 48, 2, 24, (10, 10), 4, 2),
        Case("performer", "tiny", "tiny performer", batch, 64, 27, 1, 32, features=16),
    ]
    return [c for c in tiny if op in ("all", c.op)]
