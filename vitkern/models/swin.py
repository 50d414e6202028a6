"""Swin and Swin V2 builders (timm's definitions; each block a vitkern ``SwinTransformerBlock`` /
``SwinTransformerV2Block``, where the shift, padding, window partition and attention are fused).

Keyword arguments go to timm's ``SwinTransformer`` / ``SwinTransformerV2`` (``img_size``,
``patch_size``, ``window_size``, ``embed_dim``, ``depths``, ``num_heads``, ``num_classes``, ...).
The state_dict is timm's, key for key.
"""
from __future__ import annotations

from torch import nn

from vitkern.models._timm import timm_with_vitkern

__all__ = ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
           "swinv2_tiny_window8_256"]


def swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """Swin-T: embed 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), window 7."""
    return timm_with_vitkern("swin_tiny_patch4_window7_224", pretrained, **kwargs)


def swin_small_patch4_window7_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """Swin-S: embed 96, depths (2, 2, 18, 2), heads (3, 6, 12, 24), window 7."""
    return timm_with_vitkern("swin_small_patch4_window7_224", pretrained, **kwargs)


def swin_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """Swin-B: embed 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32), window 7."""
    return timm_with_vitkern("swin_base_patch4_window7_224", pretrained, **kwargs)


def swinv2_tiny_window8_256(pretrained: bool = False, **kwargs) -> nn.Module:
    """Swin V2-T at 256: embed 96, depths (2, 2, 6, 2), window 8, cosine attention with a
    continuous position bias."""
    return timm_with_vitkern("swinv2_tiny_window8_256", pretrained, **kwargs)
