"""T2T-ViT with the Performer tokens-to-token module, built from vitkern modules.

The layout and the state_dict names follow the original T2T-ViT code, so its checkpoints load::

    tokens_to_token.soft_split0/1/2     nn.Unfold (7x7 stride 4, 3x3 stride 2, 3x3 stride 2)
    tokens_to_token.attention1/2        Token_performer -> vitkern.nn.TokenPerformer
    tokens_to_token.project             Linear(token_dim * 9, embed_dim)
    cls_token, pos_embed                pos_embed: the sinusoid table, a frozen Parameter
    blocks.{i}.norm1/attn/norm2/mlp     attn.qkv, attn.proj -> vitkern.nn.Attention
    norm, head

Tokens-to-token ("T2T") re-structures an image into tokens three times: each soft split is an
overlapping unfold that concatenates a k x k neighbourhood into one token (so tokens see their
neighbours), and between splits a Performer layer mixes the tokens and maps them to
``token_dim``; the token grid is folded back to an image before the next split. With the
224 input the grids are 56x56 (3136 tokens of 147 = 3*7*7 values), 28x28 (784 tokens of 576) and
14x14 (196 tokens, projected to ``embed_dim``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from vitkern.nn import Attention, TokenPerformer

__all__ = ["T2TViT", "T2TModule", "Block", "Mlp", "sinusoid_table",
           "t2t_vit_7", "t2t_vit_10", "t2t_vit_12", "t2t_vit_14", "t2t_vit_19", "t2t_vit_24"]


def sinusoid_table(n_position: int, d_hid: int) -> torch.Tensor:
    """T2T-ViT's ``get_sinusoid_encoding``: ``(1, n_position, d_hid)`` float32 with
    ``sin(pos / 10000^(2i/d))`` in even and ``cos`` in odd channels. Computed in float64 as the
    original (numpy) does, then rounded once."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    channel = torch.arange(d_hid)
    angle = pos / torch.pow(10000.0, (2 * (channel // 2)).to(torch.float64) / d_hid)
    table = torch.where(channel % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(torch.float32).unsqueeze(0)


def _trunc_normal_(t: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    return nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


class Mlp(nn.Module):
    """fc1 -> act -> drop -> fc2 -> drop (T2T-ViT's and timm's ``Mlp`` names)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (scaled by 1/keep)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    ``qk_scale`` overrides the softmax scale ``head_dim ** -0.5`` (T2T-ViT's pretrained weights
    were trained with ``embed_dim ** -0.5``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, norm_layer=nn.LayerNorm, backend: str = "auto"):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                              backend=backend)
        if qk_scale is not None:
            self.attn.scale = qk_scale
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class T2TModule(nn.Module):
    """Tokens-to-token with Performer layers (``tokens_type='performer'`` of T2T-ViT).

    Input ``(B, C, H, W)`` with ``H == W``; output ``(B, (H // 16) ** 2, embed_dim)``."""

    def __init__(self, img_size: int = 224, in_chans: int = 3, embed_dim: int = 768, token_dim: int = 64,
                 backend: str = "auto"):
        super().__init__()
        self.soft_split0 = nn.Unfold(kernel_size=(7, 7), stride=(4, 4), padding=(2, 2))
        self.soft_split1 = nn.Unfold(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
        self.soft_split2 = nn.Unfold(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
        self.attention1 = TokenPerformer(dim=in_chans * 7 * 7, in_dim=token_dim, kernel_ratio=0.5, backend=backend)
        self.attention2 = TokenPerformer(dim=token_dim * 3 * 3, in_dim=token_dim, kernel_ratio=0.5, backend=backend)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)
        self.num_patches = (img_size // (4 * 2 * 2)) ** 2

    @staticmethod
    def _tokens_to_image(x: torch.Tensor) -> torch.Tensor:
        B, n, C = x.shape
        side = math.isqrt(n)
        return x.transpose(1, 2).reshape(B, C, side, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.soft_split0(x).transpose(1, 2)
        x = self.attention1(x)
        x = self.soft_split1(self._tokens_to_image(x)).transpose(1, 2)
        x = self.attention2(x)
        x = self.soft_split2(self._tokens_to_image(x)).transpose(1, 2)
        return self.project(x)


class T2TViT(nn.Module):
    """T2T-ViT: tokens-to-token stem, a class token, the sinusoid position table, and a stack of
    pre-norm blocks on vitkern ``Attention``; the head reads the class token. The arguments are
    the original's, plus ``backend`` for the vitkern layers ("auto" | "triton" | "cpu" |
    "reference")."""

    def __init__(self, img_size: int = 224, tokens_type: str = "performer", in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer=nn.LayerNorm, token_dim: int = 64, backend: str = "auto"):
        super().__init__()
        if tokens_type != "performer":
            raise ValueError(f"T2TViT: tokens_type must be 'performer' (the tokens-to-token module vitkern "
                             f"fuses), got {tokens_type!r}")
        if img_size % 16:
            raise ValueError(f"T2TViT: img_size must be a multiple of 16 (three soft splits of stride "
                             f"4, 2, 2), got {img_size}")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.tokens_to_token = T2TModule(img_size=img_size, in_chans=in_chans, embed_dim=embed_dim,
                                         token_dim=token_dim, backend=backend)
        num_patches = self.tokens_to_token.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sinusoid_table(num_patches + 1, embed_dim), requires_grad=False)
        self.pos_drop = nn.Dropout(p=drop_rate)
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=rates[i], norm_layer=norm_layer,
                  backend=backend)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        _trunc_normal_(self.cls_token)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            _trunc_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self):
        return {"cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str = "") -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens_to_token(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _t2t(pretrained: bool, name: str, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float,
         **kwargs) -> T2TViT:
    if pretrained:
        raise ValueError(f"{name}: vitkern ships no weights; build with pretrained=False and load the "
                         f"original T2T-ViT checkpoint with model.load_state_dict (pass "
                         f"qk_scale={embed_dim}**-0.5 as the released weights expect)")
    return T2TViT(tokens_type="performer", embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                  mlp_ratio=mlp_ratio, **kwargs)


def t2t_vit_7(pretrained: bool = False, **kwargs) -> T2TViT:
    return _t2t(pretrained, "t2t_vit_7", 256, 7, 4, 2.0, **kwargs)


def t2t_vit_10(pretrained: bool = False, **kwargs) -> T2TViT:
    return _t2t(pretrained, "t2t_vit_10", 256, 10, 4, 2.0, **kwargs)


def t2t_vit_12(pretrained: bool = False, **kwargs) -> T2TViT:
    return _t2t(pretrained, "t2t_vit_12", 256, 12, 4, 2.0, **kwargs)


def t2t_vit_14(pretrained: bool = False, **kwargs) -> T2TViT:
    return _t2t(pretrained, "t2t_vit_14", 384, 14, 6, 3.0, **kwargs)


def t2t_vit_19(pretrained: bool = False, **kwargs) -> T2TViT:
    return _t2t(pretrained, "t2t_vit_19", 448, 19, 7, 3.0, **kwargs)


def t2t_vit_24(pretrained: bool = False, **kwargs) -> T2TViT:
    return _t2t(pretrained, "t2t_vit_24", 512, 24, 8, 3.0, **kwargs)
