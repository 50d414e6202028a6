"""Build a timm model and swap vitkern's modules into it: timm's names, timm's state_dict."""
from __future__ import annotations

from torch import nn

from vitkern.patch import patch


def require_timm():
    try:
        import timm
    except ImportError:
        raise ImportError("vitkern.models builds the ViT and Swin models from timm's definitions; "
                          "install timm (pip install timm) to use them") from None
    return timm


def timm_with_vitkern(name: str, pretrained: bool = False, backend: str = "auto", **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained, **kwargs)`` with every attention layer replaced by
    its vitkern module running on ``backend``. Raises ``vitkern.patch.PatchError`` if a layer
    cannot be replaced (e.g. a keyword turned on a feature vitkern does not implement), so the
    result is all-vitkern."""
    timm = require_timm()
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    patch(model, strict=True, backend=backend)
    return model
