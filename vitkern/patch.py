"""Swap vitkern's fused attention modules into an existing model, in place, and back.

::

    report = vitkern.patch(model)      # timm ViT/DeiT/Swin/SwinV2, torchvision ViT, T2T-ViT
    print(report)                      # what was swapped, what was left and why
    vitkern.unpatch(model)             # the original module objects again

What is recognized (each kind can be switched off by its keyword):

==================  =========================================================  ================================
keyword             layer in the model                                         replaced by
==================  =========================================================  ================================
``attention``       ``timm.layers.Attention`` (ViT, DeiT, any timm model        ``vitkern.nn.Attention``
                    whose blocks use it)
``attention``       ``nn.MultiheadAttention`` as ``self_attention`` of          ``vitkern.nn.MultiheadAttention``
                    torchvision's ViT ``EncoderBlock``
``window_attention``timm ``SwinTransformerBlock`` / ``SwinTransformerV2Block``  ``vitkern.nn.SwinTransformerBlock``
                    (the block, where shift, padding and partition fuse);       / ``SwinTransformerV2Block``
                    a timm ``WindowAttention`` whose block stays is swapped
                    on its own
``performer``       T2T-ViT ``Token_performer`` (by structure: ``kqv``,          ``vitkern.nn.TokenPerformer``
                    ``proj``, ``norm1``, ``norm2``, ``mlp``, ``w`` and
                    ``prm_exp``)
==================  =========================================================  ================================

How a swap keeps the model what it was:

- The replacement is built with the original's configuration, then takes over the original's
  parameters and persistent buffers *as objects* (child modules of the same class are taken over
  whole: the shared ``Linear``/``LayerNorm``/``Mlp`` objects keep their hooks). Nothing is copied,
  so optimizers holding the parameters keep working and ``requires_grad`` flags stay as they were.
- Non-persistent buffers (position indices, shift masks) are recomputed by the replacement from the
  same configuration and placed on the original's device and dtype.
- The state_dict keys and shapes must come out identical, else the layer is left with that reason:
  a checkpoint saved before patching loads strictly after it, and the other way round.
- train/eval flags are copied per submodule; the original's own forward/backward/state_dict hooks
  move to the replacement (the same hook dictionaries, so old handles still remove them). Hooks on
  inner submodules that the fused path no longer calls cannot run and are listed as warnings.
- A layer whose features the vitkern module does not support (e.g. ``qk_norm``) is left in place
  with the reason; ``strict=True`` raises :class:`PatchError` instead, before changing anything.

:func:`unpatch` puts the original objects back (with any parameter objects the patched model
acquired since, and buffers moved to where the model now lives), so outputs are bit-identical to
the unpatched model's.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import sys
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from vitkern._backend import BACKENDS

__all__ = ["patch", "unpatch", "is_patched", "PatchReport", "PatchEntry", "PatchError"]

# Where the patch records live on a patched module (a plain attribute: not a submodule, so it is
# in neither state_dict nor .to()/.parameters()).
_RECORDS_ATTR = "_vitkern_patch_records"

# Hook dictionaries of nn.Module that belong to the module object itself.
_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


class PatchError(ValueError):
    """Raised by ``patch(..., strict=True)`` when a recognized layer cannot be swapped."""


class _Unsupported(Exception):
    """A recognized layer that this vitkern module cannot take; the message is the reason."""


@dataclasses.dataclass
class PatchEntry:
    path: str                # dotted module path inside the patched model ("" for the root)
    kind: str                # "attention" | "window_attention" | "performer"
    original: str            # class of the layer found
    replacement: str = ""    # vitkern class that took its place (swapped entries)
    reason: str = ""         # why it was left (left / skipped entries)


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` did. ``swapped``: layers replaced; ``left``: recognized layers that could
    not be replaced (with the reason); ``skipped``: recognized layers of a kind switched off by the
    caller; ``warnings``: things that did not carry over (hooks on fused-away submodules)."""
    swapped: List[PatchEntry] = dataclasses.field(default_factory=list)
    left: List[PatchEntry] = dataclasses.field(default_factory=list)
    skipped: List[PatchEntry] = dataclasses.field(default_factory=list)
    warnings: List[str] = dataclasses.field(default_factory=list)

    def counts(self) -> Dict[str, int]:
        """Swapped layers per kind."""
        out: Dict[str, int] = {}
        for e in self.swapped:
            out[e.kind] = out.get(e.kind, 0) + 1
        return out

    def __len__(self) -> int:
        return len(self.swapped)

    def __str__(self) -> str:
        head = (f"vitkern.patch: {len(self.swapped)} swapped, {len(self.left)} left, "
                f"{len(self.skipped)} skipped")
        lines = [head]
        rows = ([("swapped", e.path or "<root>", f"{e.original} -> {e.replacement}") for e in self.swapped]
                + [("left", e.path or "<root>", f"{e.original}: {e.reason}") for e in self.left]
                + [("skipped", e.path or "<root>", f"{e.original}: {e.reason}") for e in self.skipped])
        width = max((len(r[1]) for r in rows), default=0)
        lines += [f"  {status:<8}{path:<{width}}  {what}" for status, path, what in rows]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Building a replacement from the original's configuration
# --------------------------------------------------------------------------------------------

def _qualname(obj_or_cls) -> str:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    module = cls.__module__
    if module.startswith("timm."):
        return f"timm {cls.__name__}"
    if module.startswith("torchvision."):
        return f"torchvision {cls.__name__}"
    if module.startswith("vitkern.nn"):
        return f"vitkern.nn.{cls.__name__}"
    if module.startswith("torch.nn"):
        return f"nn.{cls.__name__}"
    return f"{module}.{cls.__qualname__}"


def _construct(cls: type, config: Dict[str, object], defaults: Dict[str, object],
               opts: Dict[str, object]) -> nn.Module:
    """``cls(**config)``, passing only arguments the constructor takes. A feature the original uses
    (its value differs from ``defaults``) that the constructor cannot take makes the layer
    unsupported, as does any error the constructor raises for the configuration."""
    config = dict(config, **opts)
    defaults = dict(defaults, backend="auto")
    params = inspect.signature(cls.__init__).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {}
    for key, value in config.items():
        if key in params or takes_kwargs:
            kwargs[key] = value
        elif key in defaults and value != defaults[key]:
            raise _Unsupported(f"{key}={value!r} is not supported by {_qualname(cls)}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, NotImplementedError, AssertionError) as exc:
        raise _Unsupported(f"{_qualname(cls)} cannot take this configuration: {exc}") from None


def _first_tensor(module: nn.Module) -> Optional[torch.Tensor]:
    for t in module.parameters():
        return t
    for t in module.buffers():
        return t
    return None


def _dropout_p(module: Optional[nn.Module]) -> float:
    return float(getattr(module, "p", 0.0)) if module is not None else 0.0


def _drop_path_p(module: Optional[nn.Module]) -> float:
    return float(getattr(module, "drop_prob", 0.0) or 0.0) if module is not None else 0.0


def _resolve(path: str):
    """Import ``"package.module:Name"``; None when the package is not installed."""
    mod, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError):
        return None


def _vitkern_cls(name: str):
    cls = _resolve(f"vitkern.nn:{name}")
    if cls is None:
        raise _Unsupported(f"vitkern.nn.{name} is not available in this installation")
    return cls


# --- timm Attention ---------------------------------------------------------------------------

_TIMM_ATTENTION_DEFAULTS = dict(attn_head_dim=None, dim_out=None, qkv_bias=False, qk_norm=False,
                                scale_norm=False, proj_bias=True, gated=False, attn_drop=0.0,
                                proj_drop=0.0, norm_layer=None)


def _timm_attention_config(m: nn.Module) -> Dict[str, object]:
    qk_norm = not isinstance(m.q_norm, nn.Identity)
    scale_norm = not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity)
    norm_layer = type(m.q_norm) if qk_norm else (type(m.norm) if scale_norm else None)
    dim = m.qkv.in_features
    head_dim = m.head_dim
    return dict(
        dim=dim, num_heads=m.num_heads,
        attn_head_dim=None if head_dim * m.num_heads == dim else head_dim,
        dim_out=None if m.proj.out_features == dim else m.proj.out_features,
        qkv_bias=m.qkv.bias is not None, qk_norm=qk_norm, scale_norm=scale_norm,
        proj_bias=m.proj.bias is not None, gated=getattr(m, "gate", None) is not None,
        attn_drop=_dropout_p(m.attn_drop), proj_drop=_dropout_p(m.proj_drop), norm_layer=norm_layer)


def _build_timm_attention(m: nn.Module, opts: Dict[str, object]) -> nn.Module:
    new = _construct(_vitkern_cls("Attention"), _timm_attention_config(m), _TIMM_ATTENTION_DEFAULTS, opts)
    _carry_scale(m, new, default=m.head_dim ** -0.5)
    return new


def _carry_scale(old: nn.Module, new: nn.Module, default: float) -> None:
    """Models that override the softmax scale (T2T-ViT's ``qk_scale``) set ``.scale`` after
    construction; the replacement must use the same scale or the layer is not swappable."""
    scale = getattr(old, "scale", default)
    if math.isclose(scale, default, rel_tol=1e-12):
        return
    if not hasattr(new, "scale"):
        raise _Unsupported(f"custom scale {scale!r} is not supported by {_qualname(new)}")
    new.scale = scale


# --- torchvision EncoderBlock.self_attention (nn.MultiheadAttention) ---------------------------

_MHA_DEFAULTS = dict(dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False, kdim=None,
                     vdim=None, batch_first=False)


def _is_torchvision_encoder_block(module: Optional[nn.Module]) -> bool:
    cls = type(module)
    return cls.__name__ == "EncoderBlock" and cls.__module__.startswith("torchvision.models.vision_transformer")


def _build_multihead(m: nn.MultiheadAttention, opts: Dict[str, object]) -> nn.Module:
    if not m._qkv_same_embed_dim:
        raise _Unsupported("separate key/value dimensions (kdim/vdim != embed_dim) are not supported")
    config = dict(embed_dim=m.embed_dim, num_heads=m.num_heads, dropout=float(m.dropout),
                  bias=m.in_proj_bias is not None, add_bias_kv=m.bias_k is not None,
                  add_zero_attn=bool(m.add_zero_attn), batch_first=bool(m.batch_first))
    return _construct(_vitkern_cls("MultiheadAttention"), config, _MHA_DEFAULTS, opts)


# --- timm Swin blocks ---------------------------------------------------------------------------

_SWIN_BLOCK_DEFAULTS = dict(head_dim=None, always_partition=False, dynamic_mask=False, qkv_bias=True,
                            proj_drop=0.0, attn_drop=0.0, drop_path=0.0, pretrained_window_size=0)


def _mlp_drop(mlp: nn.Module) -> float:
    return _dropout_p(getattr(mlp, "drop1", None) or getattr(mlp, "drop", None))


def _swin_block_config(b: nn.Module) -> Dict[str, object]:
    attn = b.attn
    num_heads = attn.num_heads
    head_dim = attn.qkv.out_features // 3 // num_heads
    return dict(
        dim=b.dim, input_resolution=tuple(b.input_resolution), num_heads=num_heads,
        head_dim=None if head_dim * num_heads == b.dim else head_dim,
        window_size=tuple(b.window_size), shift_size=tuple(b.target_shift_size),
        always_partition=bool(b.always_partition), dynamic_mask=bool(getattr(b, "dynamic_mask", False)),
        mlp_ratio=b.mlp_ratio, qkv_bias=attn.qkv.bias is not None, proj_drop=_mlp_drop(b.mlp),
        attn_drop=_dropout_p(attn.attn_drop), drop_path=_drop_path_p(b.drop_path1),
        act_layer=type(b.mlp.act), norm_layer=type(b.norm1))


def _build_swin_block(b: nn.Module, opts: Dict[str, object]) -> nn.Module:
    new = _construct(_vitkern_cls("SwinTransformerBlock"), _swin_block_config(b), _SWIN_BLOCK_DEFAULTS, opts)
    _check_same(b, new, ("window_size", "shift_size"))
    return new


def _swin_v2_block_config(b: nn.Module) -> Dict[str, object]:
    attn = b.attn
    config = dict(
        dim=b.dim, input_resolution=tuple(b.input_resolution), num_heads=attn.num_heads,
        window_size=tuple(b.window_size), shift_size=tuple(b.target_shift_size),
        always_partition=bool(b.always_partition), dynamic_mask=bool(getattr(b, "dynamic_mask", False)),
        mlp_ratio=b.mlp_ratio, qkv_bias=attn.q_bias is not None, proj_drop=_mlp_drop(b.mlp),
        attn_drop=_dropout_p(attn.attn_drop), drop_path=_drop_path_p(b.drop_path1),
        act_layer=type(b.mlp.act), norm_layer=type(b.norm1),
        pretrained_window_size=tuple(attn.pretrained_window_size))
    if getattr(attn, "qkv_bias_separate", False):
        raise _Unsupported("qkv_bias_separate=True is not supported")
    return config


def _build_swin_v2_block(b: nn.Module, opts: Dict[str, object]) -> nn.Module:
    defaults = dict(_SWIN_BLOCK_DEFAULTS, pretrained_window_size=(0, 0))
    new = _construct(_vitkern_cls("SwinTransformerV2Block"), _swin_v2_block_config(b), defaults, opts)
    _check_same(b, new, ("window_size", "shift_size"))
    return new


def _check_same(old: nn.Module, new: nn.Module, attrs: Tuple[str, ...]) -> None:
    for a in attrs:
        if hasattr(new, a) and tuple(getattr(new, a)) != tuple(getattr(old, a)):
            raise _Unsupported(f"{a} came out {tuple(getattr(new, a))}, the original has {tuple(getattr(old, a))}")


def _build_window_attention(m: nn.Module, opts: Dict[str, object]) -> nn.Module:
    num_heads = m.num_heads
    head_dim = m.qkv.out_features // 3 // num_heads
    config = dict(dim=m.dim, num_heads=num_heads, head_dim=None if head_dim * num_heads == m.dim else head_dim,
                  window_size=tuple(m.window_size), qkv_bias=m.qkv.bias is not None,
                  attn_drop=_dropout_p(m.attn_drop), proj_drop=_dropout_p(m.proj_drop))
    new = _construct(_vitkern_cls("WindowAttention"), config,
                     dict(head_dim=None, qkv_bias=True, attn_drop=0.0, proj_drop=0.0), opts)
    _carry_scale(m, new, default=head_dim ** -0.5)
    return new


def _build_window_attention_v2(m: nn.Module, opts: Dict[str, object]) -> nn.Module:
    if getattr(m, "qkv_bias_separate", False):
        raise _Unsupported("qkv_bias_separate=True is not supported")
    config = dict(dim=m.dim, window_size=tuple(m.window_size), num_heads=m.num_heads,
                  qkv_bias=m.q_bias is not None, attn_drop=_dropout_p(m.attn_drop),
                  proj_drop=_dropout_p(m.proj_drop), pretrained_window_size=tuple(m.pretrained_window_size))
    return _construct(_vitkern_cls("WindowAttentionV2"), config,
                      dict(qkv_bias=True, attn_drop=0.0, proj_drop=0.0, pretrained_window_size=(0, 0)), opts)


# --- T2T-ViT Token_performer ---------------------------------------------------------------------

_PERFORMER_ATTRS = ("kqv", "proj", "norm1", "norm2", "mlp", "w")


def _looks_like_token_performer(m: nn.Module) -> bool:
    return (all(hasattr(m, a) for a in _PERFORMER_ATTRS) and callable(getattr(m, "prm_exp", None))
            and isinstance(m.kqv, nn.Linear) and isinstance(m.w, torch.Tensor))


def _build_token_performer(m: nn.Module, opts: Dict[str, object]) -> nn.Module:
    emb = m.kqv.out_features // 3
    head_cnt = int(getattr(m, "head_cnt", 1))
    if emb % head_cnt:
        raise _Unsupported(f"token width {emb} is not divisible by head_cnt={head_cnt}")
    n_features = m.w.shape[0]
    dp2 = _dropout_p(m.mlp[-1]) if isinstance(m.mlp, nn.Sequential) and len(m.mlp) else 0.0
    # T2T stores m = int(emb * kernel_ratio); pick a ratio that reproduces m exactly.
    ratio = n_features / emb if int(emb * (n_features / emb)) == n_features else (n_features + 0.5) / emb
    config = dict(dim=m.kqv.in_features, in_dim=emb // head_cnt, head_cnt=head_cnt, kernel_ratio=ratio, dp1=_dropout_p(getattr(m, "dp", None)), dp2=dp2)
    new = _construct(_vitkern_cls("TokenPerformer"), config, {}, opts)
    new_w = getattr(new, "w", None)
    if new_w is None or tuple(new_w.shape) != tuple(m.w.shape):
        raise _Unsupported(f"random-feature matrix w of shape {tuple(m.w.shape)} cannot be reproduced")
    if hasattr(m, "epsilon"):
        if not hasattr(new, "epsilon"):
            raise _Unsupported("denominator epsilon cannot be set on the replacement")
        new.epsilon = m.epsilon
    return new


# --------------------------------------------------------------------------------------------
# Recognition
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Rule:
    kind: str
    cls_path: Optional[str]            # "module:Class" matched exactly; None for structural rules
    build: Callable[[nn.Module, Dict[str, object]], nn.Module]
    match: Optional[Callable[[nn.Module, Optional[nn.Module], str], bool]] = None  # extra condition


_RULES = (
    _Rule("attention", "timm.layers:Attention", _build_timm_attention),
    _Rule("attention", "torch.nn:MultiheadAttention", _build_multihead,
          match=lambda m, parent, name: _is_torchvision_encoder_block(parent) and name == "self_attention"),
    _Rule("window_attention", "timm.models.swin_transformer:SwinTransformerBlock", _build_swin_block),
    _Rule("window_attention", "timm.models.swin_transformer_v2:SwinTransformerV2Block", _build_swin_v2_block),
    _Rule("window_attention", "timm.models.swin_transformer:WindowAttention", _build_window_attention),
    _Rule("window_attention", "timm.models.swin_transformer_v2:WindowAttention", _build_window_attention_v2),
    _Rule("performer", None, _build_token_performer,
          match=lambda m, parent, name: _looks_like_token_performer(m)),
)


def _loaded_rule_classes() -> List[Tuple[_Rule, Optional[type]]]:
    """The rules with their classes; a rule whose package is absent (no timm) matches nothing."""
    out = []
    for rule in _RULES:
        if rule.cls_path is None:
            out.append((rule, None))
            continue
        mod = rule.cls_path.partition(":")[0]
        # Only look at packages the model could be using: they are imported already if so.
        if mod.split(".")[0] not in sys.modules:
            continue
        cls = _resolve(rule.cls_path)
        if cls is not None:
            out.append((rule, cls))
    return out


def _is_vitkern_module(m: nn.Module) -> bool:
    return type(m).__module__.startswith("vitkern.nn")


def _recognize(m: nn.Module, parent: Optional[nn.Module], name: str, rules) -> Tuple[Optional[_Rule], str]:
    """(rule, "") for a swappable candidate; (rule, reason) for a recognized layer that cannot be
    taken as it is; (None, "") for anything else."""
    if _is_vitkern_module(m):
        return None, ""
    for rule, cls in rules:
        if cls is None:
            if rule.match(m, parent, name):
                return rule, ""
            continue
        if type(m) is cls:
            if rule.match is not None and not rule.match(m, parent, name):
                if cls is nn.MultiheadAttention:
                    return rule, ("only the self_attention of torchvision's ViT EncoderBlock is swapped; "
                                  "other callers may pass masks or distinct key/value, or need the weights")
                return None, ""
            return rule, ""
        if isinstance(m, cls):
            return rule, (f"subclass of {_qualname(cls)}: its own code may change what the layer computes")
    return None, ""


# --------------------------------------------------------------------------------------------
# Taking over the original's state
# --------------------------------------------------------------------------------------------

def _adopt(old: nn.Module, new: nn.Module) -> None:
    """Make ``new`` use ``old``'s parameters, persistent buffers and same-class child modules."""
    for name, child in list(new._modules.items()):
        old_child = old._modules.get(name)
        if child is None or old_child is None:
            continue
        if type(old_child) is type(child):
            new._modules[name] = old_child
        else:
            _adopt(old_child, child)
    for name in list(new._parameters):
        if name in old._parameters and old._parameters[name] is not None:
            ref = new._parameters[name]
            if ref is not None and tuple(ref.shape) != tuple(old._parameters[name].shape):
                raise _Unsupported(f"parameter {name} has shape {tuple(ref.shape)}, "
                                   f"the original {tuple(old._parameters[name].shape)}")
            new._parameters[name] = old._parameters[name]
    for name in list(new._buffers):
        if name in new._non_persistent_buffers_set:
            continue
        if name in old._buffers and name not in old._non_persistent_buffers_set:
            new._buffers[name] = old._buffers[name]


def _place_own_buffers(old: nn.Module, new: nn.Module) -> None:
    """Put the buffers the replacement computed itself where the original's live."""
    ref = _first_tensor(old)
    old_buffers = dict(old.named_buffers(remove_duplicate=False))
    for mod_name, mod in new.named_modules(remove_duplicate=False):
        for name, buf in list(mod._buffers.items()):
            if buf is None:
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            twin = old_buffers.get(full)
            if twin is buf:
                continue
            if twin is not None:
                device, dtype = twin.device, twin.dtype
            elif ref is not None:
                device, dtype = ref.device, ref.dtype
            else:
                continue
            mod._buffers[name] = buf.to(device=device, dtype=dtype if buf.is_floating_point() and
                                        dtype.is_floating_point else buf.dtype)


def _state_signature(m: nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in m.state_dict(keep_vars=True).items()}


def _check_state_dict(old: nn.Module, new: nn.Module) -> None:
    a, b = _state_signature(old), _state_signature(new)
    if a == b:
        return
    missing = sorted(set(a) - set(b))
    extra = sorted(set(b) - set(a))
    shapes = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    parts = []
    if missing:
        parts.append(f"keys only in the original: {missing[:4]}")
    if extra:
        parts.append(f"keys only in the replacement: {extra[:4]}")
    if shapes:
        parts.append(f"shapes differ for {shapes[:4]}")
    raise _Unsupported("state_dict would change (" + "; ".join(parts) + ")")


def _copy_flags(old: nn.Module, new: nn.Module) -> None:
    old_modules = dict(old.named_modules(remove_duplicate=False))
    for name, mod in new.named_modules(remove_duplicate=False):
        twin = old_modules.get(name)
        mod.training = twin.training if twin is not None else old.training


def _move_hooks(src: nn.Module, dst: nn.Module) -> None:
    for attr in _HOOK_DICTS:
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))
    if hasattr(src, "_is_full_backward_hook"):
        dst._is_full_backward_hook = src._is_full_backward_hook


def _has_hooks(m: nn.Module) -> bool:
    return any(len(getattr(m, attr, ())) for attr in _HOOK_DICTS[:7])


def _lost_hooks(old: nn.Module, new: nn.Module, path: str) -> List[str]:
    kept = {id(m) for m in new.modules()}
    out = []
    for name, mod in old.named_modules():
        if not name or not _has_hooks(mod):
            continue
        full = f"{path}.{name}" if path else name
        if id(mod) not in kept:
            out.append(f"hooks on {full} ({_qualname(mod)}) do not run: the fused module does not call it")
        elif isinstance(mod, _FUSED_AWAY):
            # Kept for its settings (dropout p) and state_dict, but the kernel does the work itself.
            out.append(f"hooks on {full} ({_qualname(mod)}) may not run: the fused kernel applies it")
    return out


# Submodules of attention layers whose computation the fused kernels perform themselves.
_FUSED_AWAY = (nn.Dropout, nn.Softmax)


def _make_replacement(rule: _Rule, old: nn.Module, opts: Dict[str, object]) -> nn.Module:
    new = rule.build(old, opts)
    _adopt(old, new)
    _check_state_dict(old, new)
    _place_own_buffers(old, new)
    _copy_flags(old, new)
    return new


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Record:
    parent: nn.Module
    name: str
    path: str
    original: nn.Module
    replacement: nn.Module


def patch(model: nn.Module, attention: bool = True, window_attention: bool = True, performer: bool = True,
          strict: bool = False, backend: str = "auto") -> PatchReport:
    """Replace, in place, the attention layers of ``model`` that vitkern implements (see the
    module docstring) and return a :class:`PatchReport`.

    ``attention``/``window_attention``/``performer`` switch each kind on or off. With
    ``strict=True`` a recognized layer that cannot be swapped raises :class:`PatchError` (naming
    every such layer and why) and the model is left untouched. ``backend`` ("auto" | "triton" |
    "cpu" | "reference") is given to every replacement (``"triton"`` runs the Triton kernels on
    CPU tensors under ``TRITON_INTERPRET=1``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    for arg, value in (("attention", attention), ("window_attention", window_attention),
                       ("performer", performer), ("strict", strict)):
        if not isinstance(value, bool):
            raise TypeError(f"patch: {arg} must be a bool, got {type(value).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"patch: backend must be one of {BACKENDS}, got {backend!r}")
    opts = {"backend": backend} if backend != "auto" else {}
    enabled = {"attention": attention, "window_attention": window_attention, "performer": performer}
    rules = _loaded_rule_classes()
    report = PatchReport()
    plan: List[Tuple[nn.Module, str, str, nn.Module, nn.Module]] = []
    done: Dict[int, nn.Module] = {}   # a module reachable by two paths gets one replacement

    def visit(parent: Optional[nn.Module], name: str, module: nn.Module, path: str) -> None:
        if _is_vitkern_module(module):
            return   # already vitkern (a second patch, or a vitkern.models model): nothing below to swap
        rule, reason = _recognize(module, parent, name, rules)
        if rule is not None:
            entry = PatchEntry(path, rule.kind, _qualname(module))
            if not enabled[rule.kind]:
                entry.reason = f"{rule.kind}=False"
                report.skipped.append(entry)
                return   # nothing of another kind lives inside these layers
            elif reason:
                entry.reason = reason
                report.left.append(entry)
            elif parent is None:
                entry.reason = "the model itself is the layer: patch its parent module instead"
                report.left.append(entry)
            else:
                new = done.get(id(module))
                if new is None:
                    try:
                        new = _make_replacement(rule, module, opts)
                    except _Unsupported as exc:
                        entry.reason = str(exc)
                        report.left.append(entry)
                        new = None
                if new is not None:
                    done[id(module)] = new
                    entry.replacement = _qualname(new)
                    report.swapped.append(entry)
                    report.warnings.extend(_lost_hooks(module, new, path))
                    plan.append((parent, name, path, module, new))
                    return   # the replacement covers everything below
        for child_name, child in module._modules.items():
            if child is not None:
                visit(module, child_name, child, f"{path}.{child_name}" if path else child_name)

    visit(None, "", model, "")
    if strict and report.left:
        listing = "\n".join(f"  {e.path or '<root>'} ({e.original}): {e.reason}" for e in report.left)
        raise PatchError(f"patch(strict=True): {len(report.left)} recognized layer(s) cannot be swapped; "
                         f"the model was not changed:\n{listing}")

    records = model.__dict__.setdefault(_RECORDS_ATTR, [])
    for parent, name, path, old, new in plan:
        _move_hooks(old, new)
        parent._modules[name] = new
        records.append(_Record(parent, name, path, old, new))
    return report


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` (or a submodule patched on its own) holds vitkern replacements that
    :func:`unpatch` can undo."""
    return any(getattr(m, _RECORDS_ATTR, None) for m in model.modules())


def _give_back(new: nn.Module, old: nn.Module) -> None:
    """Before the original returns: hand it the replacement's current parameter/buffer objects
    (the model may have been moved, cast, or had parameters reassigned since patching), and move
    the original's leftover buffers to where the model lives now."""
    new_params = dict(new.named_parameters(remove_duplicate=False))
    new_buffers = dict(new.named_buffers(remove_duplicate=False))
    ref = _first_tensor(new)
    for mod_name, mod in old.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in list(mod._parameters.items()):
            twin = new_params.get(prefix + name)
            if p is not None and twin is not None:
                mod._parameters[name] = twin
        for name, b in list(mod._buffers.items()):
            if b is None:
                continue
            twin = new_buffers.get(prefix + name)
            if twin is not None and name not in mod._non_persistent_buffers_set:
                mod._buffers[name] = twin
            elif twin is not None:
                cast = twin.dtype if b.is_floating_point() and twin.is_floating_point() else b.dtype
                mod._buffers[name] = b.to(device=twin.device, dtype=cast)
            elif ref is not None:
                mod._buffers[name] = b.to(ref.device)
    new_modules = dict(new.named_modules(remove_duplicate=False))
    for name, mod in old.named_modules(remove_duplicate=False):
        twin = new_modules.get(name)
        mod.training = twin.training if twin is not None else new.training


def unpatch(model: nn.Module) -> int:
    """Put back the original modules that :func:`patch` replaced in ``model`` (and in submodules
    patched on their own). Returns how many were restored. The originals get the parameter
    objects the model holds now, so training done while patched is kept."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    restored = 0
    for holder in list(model.modules()):
        records = holder.__dict__.get(_RECORDS_ATTR)
        if not records:
            continue
        for rec in reversed(records):
            if rec.parent._modules.get(rec.name) is not rec.replacement:
                continue   # replaced again by the user since: leave their module alone
            _give_back(rec.replacement, rec.original)
            _move_hooks(rec.replacement, rec.original)
            rec.parent._modules[rec.name] = rec.original
            restored += 1
        del holder.__dict__[_RECORDS_ATTR]
    return restored


class _CallableModule(types.ModuleType):
    """``vitkern.patch`` names both this module and its main function. Once the module has been
    imported, Python binds the attribute ``vitkern.patch`` to the module, so ``vitkern.patch(model)``
    would stop working; making the module callable keeps both spellings equivalent."""

    def __call__(self, *args, **kwargs) -> PatchReport:
        return patch(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
