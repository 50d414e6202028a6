"""Model builders made of vitkern modules.

``create_model(name, **kwargs)`` / ``list_models(pattern="*")``. The ViT, DeiT and Swin names are
timm's models with every attention layer swapped for its vitkern module (timm's names and
state_dict, so timm checkpoints load strictly; keyword arguments go to timm). The T2T-ViT names
are built here from vitkern modules with the original T2T-ViT repository's state_dict names.
"""
from __future__ import annotations

import fnmatch
import importlib
from typing import List

from torch import nn

# name -> module that defines the builder of the same name
_BUILDERS = {
    "vit_tiny_patch16_224": "vit", "vit_small_patch16_224": "vit", "vit_base_patch16_224": "vit",
    "deit_tiny_patch16_224": "vit", "deit_small_patch16_224": "vit", "deit_base_patch16_224": "vit",
    "swin_tiny_patch4_window7_224": "swin", "swin_small_patch4_window7_224": "swin",
    "swin_base_patch4_window7_224": "swin", "swinv2_tiny_window8_256": "swin",
    "t2t_vit_7": "t2t_vit", "t2t_vit_10": "t2t_vit", "t2t_vit_12": "t2t_vit", "t2t_vit_14": "t2t_vit",
    "t2t_vit_19": "t2t_vit", "t2t_vit_24": "t2t_vit",
}

__all__ = ["create_model", "list_models"]


def list_models(pattern: str = "*") -> List[str]:
    """Names ``create_model`` accepts, sorted, filtered by a shell-style ``pattern``."""
    if not isinstance(pattern, str):
        raise TypeError(f"list_models: pattern must be a str, got {type(pattern).__name__}")
    return sorted(n for n in _BUILDERS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build model ``name`` (see :func:`list_models`); ``kwargs`` go to the model's constructor."""
    if not isinstance(name, str):
        raise TypeError(f"create_model: name must be a str, got {type(name).__name__}")
    module = _BUILDERS.get(name)
    if module is None:
        close = fnmatch.filter(_BUILDERS, f"*{name.split('_')[0]}*") or sorted(_BUILDERS)
        raise ValueError(f"create_model: unknown name {name!r}; known: {', '.join(sorted(close))}")
    builder = getattr(importlib.import_module(f"vitkern.models.{module}"), name)
    return builder(pretrained=pretrained, **kwargs)
