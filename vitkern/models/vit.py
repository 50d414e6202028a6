"""ViT builders (timm's ``vision_transformer`` definitions, vitkern ``Attention`` inside).

Keyword arguments go to timm's ``VisionTransformer`` (``img_size``, ``patch_size``, ``in_chans``,
``num_classes``, ``depth``, ``embed_dim``, ``num_heads``, ``drop_rate``, ...), so small variants for
small images come from the same builders. The state_dict is timm's, key for key.
"""
from __future__ import annotations

from torch import nn

from vitkern.models._timm import timm_with_vitkern

__all__ = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
           "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]


def vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """ViT-Ti/16: embed 192, depth 12, 3 heads of 64."""
    return timm_with_vitkern("vit_tiny_patch16_224", pretrained, **kwargs)


def vit_small_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """ViT-S/16: embed 384, depth 12, 6 heads of 64."""
    return timm_with_vitkern("vit_small_patch16_224", pretrained, **kwargs)


def vit_base_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """ViT-B/16: embed 768, depth 12, 12 heads of 64."""
    return timm_with_vitkern("vit_base_patch16_224", pretrained, **kwargs)


def deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """DeiT-Ti: the ViT-Ti/16 architecture."""
    return timm_with_vitkern("deit_tiny_patch16_224", pretrained, **kwargs)


def deit_small_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """DeiT-S: the ViT-S/16 architecture."""
    return timm_with_vitkern("deit_small_patch16_224", pretrained, **kwargs)


def deit_base_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """DeiT-B: the ViT-B/16 architecture."""
    return timm_with_vitkern("deit_base_patch16_224", pretrained, **kwargs)
