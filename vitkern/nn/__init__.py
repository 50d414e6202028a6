"""Drop-in ``nn.Module`` replacements with the constructor arguments and ``state_dict`` keys of
the layers they replace (timm, torchvision, T2T-ViT)."""
import importlib as _importlib

_LAZY = {
    "Attention": "vitkern.nn.attention",                 # timm.layers.Attention
    "MultiheadAttention": "vitkern.nn.multihead",        # nn.MultiheadAttention (torchvision ViT)
    "WindowAttention": "vitkern.nn.swin",                # timm swin WindowAttention
    "SwinTransformerBlock": "vitkern.nn.swin",
    "WindowAttentionV2": "vitkern.nn.swin_v2",
    "SwinTransformerV2Block": "vitkern.nn.swin_v2",
    "TokenPerformer": "vitkern.nn.performer",            # T2T-ViT Token_performer
    "PerformerAttention": "vitkern.nn.performer",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vitkern.nn' has no attribute {name!r}")
