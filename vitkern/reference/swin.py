"""Eager ground truth for Swin (V1 and V2) shifted-window attention.

Everything here is written the literal way - roll, pad, partition, attend, reverse, crop, roll
back - in plain PyTorch, works in float64, and matches timm 1.0.31 to rounding:

- :func:`window_partition` / :func:`window_reverse`: (B, H, W, C) <-> (B*nW, Wh, Ww, C).
- :func:`relative_position_index`: the (N, N) index into the relative-position bias table.
- :func:`region_ids` / :func:`shift_mask`: the SW-MSA regions of the padded grid and the additive
  (-100, not -inf) mask between tokens of different regions.
- :func:`window_attention_from_qkv`: the op contract. Takes the qkv projection of the *unshifted,
  unpadded* image, returns the attention output in image layout, ready for the output Linear.
- :func:`shifted_window_attention`: a block's attention path, from the (normed) block input to the
  output of ``proj``.
- :class:`WindowAttention`: an eager module with timm's constructor, parameter names and
  ``forward(x, mask)`` on already partitioned windows.
- SwinV2: :func:`log_spaced_coords_table`, :func:`continuous_position_bias_table`,
  :func:`clamped_logit_scale`, :class:`WindowAttentionV2`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

IntOrPair = Union[int, Sequence[int]]

MASK_VALUE = -100.0          # timm's additive mask between shift regions (not -inf)
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)   # SwinV2 clamps log(logit scale) at log(100)
NORMALIZE_EPS = 1e-12        # F.normalize default, used by SwinV2's cosine attention


def to_pair(v: IntOrPair) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(e) for e in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair, got {v}")
    return v


def padded_size(H: int, W: int, window_size: IntOrPair) -> Tuple[int, int]:
    """The image size rounded up to whole windows (timm pads bottom/right to it)."""
    wh, ww = to_pair(window_size)
    return math.ceil(H / wh) * wh, math.ceil(W / ww) * ww


def effective_window_shift(input_resolution: IntOrPair, window_size: IntOrPair, shift_size: IntOrPair,
                           always_partition: bool = False) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """timm's rule: a side no larger than its window shrinks the window to the side and drops that
    side's shift, unless ``always_partition``."""
    window_size, shift_size = to_pair(window_size), to_pair(shift_size)
    if always_partition:
        return window_size, shift_size
    res = to_pair(input_resolution)
    win = tuple(r if r <= w else w for r, w in zip(res, window_size))
    shift = tuple(0 if r <= w else s for r, w, s in zip(res, win, shift_size))
    return win, shift


def window_partition(x: torch.Tensor, window_size: IntOrPair) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of the window -> (B * nW, Wh, Ww, C), windows row-major."""
    wh, ww = to_pair(window_size)
    B, H, W, C = x.shape
    x = x.view(B, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, C)


def window_reverse(windows: torch.Tensor, window_size: IntOrPair, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, Wh, Ww, C) -> (B, H, W, C)."""
    wh, ww = to_pair(window_size)
    C = windows.shape[-1]
    x = windows.reshape(-1, H // wh, W // ww, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def relative_position_index(Wh: int, Ww: int, device=None) -> torch.Tensor:
    """(N, N) long, N = Wh*Ww: idx(p, q) = (i_p - i_q + Wh - 1) * (2Ww - 1) + (j_p - j_q + Ww - 1)
    where token p sits at row i_p, column j_p of the window."""
    i = torch.arange(Wh, device=device).repeat_interleave(Ww)
    j = torch.arange(Ww, device=device).repeat(Wh)
    di = i[:, None] - i[None, :] + (Wh - 1)
    dj = j[:, None] - j[None, :] + (Ww - 1)
    return di * (2 * Ww - 1) + dj


def relative_position_bias(bias_table: torch.Tensor, window_size: IntOrPair) -> torch.Tensor:
    """Gather the ((2Wh-1)(2Ww-1), nH) table into the per-head (nH, N, N) bias."""
    wh, ww = to_pair(window_size)
    n = wh * ww
    idx = relative_position_index(wh, ww, device=bias_table.device)
    return bias_table[idx.view(-1)].view(n, n, -1).permute(2, 0, 1)


def _axis_regions(size_p: int, win: int, shift: int, device=None) -> torch.Tensor:
    # timm assigns slices (0, -win), (-win, -shift), (-shift, None) in turn, later ones
    # overwriting earlier ones; with shift == 0 the last slice is the whole axis.
    ids = torch.zeros(size_p, dtype=torch.long, device=device)
    for r, (lo, hi) in enumerate(((0, -win), (-win, -shift), (-shift, None))):
        ids[lo:hi] = r
    return ids


def region_ids(Hp: int, Wp: int, window_size: IntOrPair, shift_size: IntOrPair, device=None) -> torch.Tensor:
    """(Hp, Wp) long region label of every position of the padded, shifted grid (timm's img_mask)."""
    wh, ww = to_pair(window_size)
    sh, sw = to_pair(shift_size)
    rows = _axis_regions(Hp, wh, sh, device)
    cols = _axis_regions(Wp, ww, sw, device)
    return rows[:, None] * 3 + cols[None, :]


def shift_mask(Hp: int, Wp: int, window_size: IntOrPair, shift_size: IntOrPair, dtype=torch.float32,
               device=None) -> Optional[torch.Tensor]:
    """(nW, N, N) additive SW-MSA mask (0 inside a region, -100 across regions), or None without
    a shift. Window w of image b uses mask[w] (timm indexes it as window % nW)."""
    sh, sw = to_pair(shift_size)
    if sh == 0 and sw == 0:
        return None
    wh, ww = to_pair(window_size)
    ids = region_ids(Hp, Wp, (wh, ww), (sh, sw), device).view(1, Hp, Wp, 1)
    ids = window_partition(ids, (wh, ww)).reshape(-1, wh * ww)
    differ = ids[:, None, :] != ids[:, :, None]
    mask = torch.zeros(differ.shape, dtype=dtype, device=device)
    return mask.masked_fill(differ, MASK_VALUE)


def clamped_logit_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """SwinV2's per-head multiplier exp(min(logit_scale, log 100)), shaped (nH, 1, 1)."""
    return torch.clamp(logit_scale.reshape(-1, 1, 1), max=LOGIT_SCALE_MAX).exp()


def attention_in_windows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         bias: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                         logit_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention on partitioned windows. q, k, v: (B*nW, nH, N, d); bias (nH, N, N); mask
    (nW, N, N) indexed by window % nW; logit_scale switches to SwinV2's cosine attention.
    Returns (B*nW, nH, N, d)."""
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1, eps=NORMALIZE_EPS) @ F.normalize(k, dim=-1, eps=NORMALIZE_EPS).transpose(-2, -1)
        attn = attn * clamped_logit_scale(logit_scale)
    else:
        attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias.unsqueeze(0)
    if mask is not None:
        nw, n = mask.shape[0], mask.shape[-1]
        attn = attn.view(-1, nw, attn.shape[1], n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, attn.shape[2], n, n)
    attn = attn.softmax(dim=-1)
    return attn @ v


def window_attention_from_qkv(qkv: torch.Tensor, num_heads: int, window_size: IntOrPair,
                              shift_size: IntOrPair, bias_table: Optional[torch.Tensor] = None,
                              pad_qkv: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                              logit_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Shifted-window attention on the qkv projection of a whole image (the op's contract).

    qkv: (B, H, W, 3C), channels [q | k | v], head-major inside each. bias_table:
    ((2Wh-1)(2Ww-1), nH) (for SwinV2: already 16*sigmoid(cpb_mlp(coords))). pad_qkv: (3C,) the qkv
    of a zero input token (the Linear's bias) used for the padded tokens; zeros if None.
    logit_scale (nH,) or (nH, 1, 1): cosine attention, ``scale`` ignored. Returns (B, H, W, C).
    """
    wh, ww = to_pair(window_size)
    sh, sw = to_pair(shift_size)
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    scale = d ** -0.5 if scale is None else scale

    x = torch.roll(qkv, shifts=(-sh, -sw), dims=(1, 2)) if (sh or sw) else qkv
    Hp, Wp = padded_size(H, W, (wh, ww))
    if (Hp, Wp) != (H, W):
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        if pad_qkv is not None:
            inside = torch.zeros(Hp, Wp, 1, dtype=torch.bool, device=qkv.device)
            inside[:H, :W] = True
            x = torch.where(inside, x, pad_qkv.reshape(1, 1, 1, C3).to(x.dtype))

    n = wh * ww
    win = window_partition(x, (wh, ww)).reshape(-1, n, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = win.unbind(0)
    bias = relative_position_bias(bias_table, (wh, ww)) if bias_table is not None else None
    mask = shift_mask(Hp, Wp, (wh, ww), (sh, sw), dtype=qkv.dtype, device=qkv.device)
    out = attention_in_windows(q, k, v, scale, bias, mask, logit_scale)

    out = out.transpose(1, 2).reshape(-1, wh, ww, C)
    out = window_reverse(out, (wh, ww), Hp, Wp)[:, :H, :W, :]
    return torch.roll(out, shifts=(sh, sw), dims=(1, 2)) if (sh or sw) else out


def shifted_window_attention(x: torch.Tensor, num_heads: int, window_size: IntOrPair, shift_size: IntOrPair,
                             qkv_weight: torch.Tensor, qkv_bias: Optional[torch.Tensor] = None,
                             proj_weight: Optional[torch.Tensor] = None, proj_bias: Optional[torch.Tensor] = None,
                             bias_table: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                             logit_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A Swin block's attention path on the (normed) block input x: (B, H, W, C_in) -> (B, H, W, C_out).
    For SwinV2, pass qkv_bias = cat(q_bias, 0, v_bias) and logit_scale."""
    qkv = F.linear(x, qkv_weight, qkv_bias)
    out = window_attention_from_qkv(qkv, num_heads, window_size, shift_size, bias_table=bias_table,
                                    pad_qkv=qkv_bias, scale=scale, logit_scale=logit_scale)
    return F.linear(out, proj_weight, proj_bias) if proj_weight is not None else out


def log_spaced_coords_table(window_size: IntOrPair, pretrained_window_size: IntOrPair = 0,
                            dtype=None, device=None) -> torch.Tensor:
    """SwinV2's (1, 2Wh-1, 2Ww-1, 2) relative coordinates, normalised to [-8, 8] and log-spaced:
    sign(c) * log2(|c| + 1) / 3. Computed in float32 (as timm does) then cast."""
    wh, ww = to_pair(window_size)
    pw = to_pair(pretrained_window_size)
    denom = pw if pw[0] > 0 else (wh, ww)
    ch = torch.arange(-(wh - 1), wh, device=device, dtype=torch.float32) / max(denom[0] - 1, 1)
    cw = torch.arange(-(ww - 1), ww, device=device, dtype=torch.float32) / max(denom[1] - 1, 1)
    table = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).unsqueeze(0) * 8
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table.to(dtype=dtype) if dtype is not None else table


def continuous_position_bias_table(cpb_mlp: nn.Module, coords_table: torch.Tensor, num_heads: int) -> torch.Tensor:
    """SwinV2's bias table, ((2Wh-1)(2Ww-1), nH) = 16 * sigmoid(cpb_mlp(coords))."""
    return 16 * torch.sigmoid(cpb_mlp(coords_table).view(-1, num_heads))


def make_cpb_mlp(num_heads: int, hidden: int = 512, device=None, dtype=None) -> nn.Sequential:
    """SwinV2's continuous position bias MLP (state_dict keys cpb_mlp.0.*, cpb_mlp.2.weight)."""
    dd = {"device": device, "dtype": dtype}
    return nn.Sequential(nn.Linear(2, hidden, bias=True, **dd), nn.ReLU(inplace=True),
                         nn.Linear(hidden, num_heads, bias=False, **dd))


class WindowAttention(nn.Module):
    """Eager Swin window attention with timm's constructor and parameter names, on partitioned
    windows: forward(x: (B*nW, N, C), mask: (nW, N, N) or None) -> (B*nW, N, dim)."""

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, window_size: IntOrPair = 7,
                 qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0., device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.dim = dim
        self.window_size = to_pair(window_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.num_heads = num_heads
        head_dim = head_dim or dim // num_heads
        self.head_dim = head_dim
        attn_dim = head_dim * num_heads
        self.scale = head_dim ** -0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * wh - 1) * (2 * ww - 1), num_heads, **dd))
        self.register_buffer("relative_position_index",
                             torch.empty(self.window_area, self.window_area, device=device, dtype=torch.long),
                             persistent=False)
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._init_buffers()

    def _init_buffers(self) -> None:
        self.relative_position_index.copy_(relative_position_index(*self.window_size,
                                                                   device=self.relative_position_index.device))

    def init_non_persistent_buffers(self) -> None:
        self._init_buffers()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = relative_position_bias(self.relative_position_bias_table, self.window_size)
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError("the reference has no attention dropout")
        out = attention_in_windows(q, k, v, self.scale, bias, mask)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B_, N, -1)))


class WindowAttentionV2(nn.Module):
    """Eager SwinV2 window attention (cosine attention, continuous position bias) with timm's
    constructor and parameter names; forward on partitioned windows like :class:`WindowAttention`."""

    def __init__(self, dim: int, window_size: IntOrPair, num_heads: int, qkv_bias: bool = True,
                 qkv_bias_separate: bool = False, attn_drop: float = 0., proj_drop: float = 0.,
                 pretrained_window_size: IntOrPair = (0, 0), device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.dim = dim
        self.window_size = to_pair(window_size)
        self.pretrained_window_size = to_pair(pretrained_window_size)
        self.num_heads = num_heads
        self.qkv_bias_separate = qkv_bias_separate
        self.logit_scale = nn.Parameter(torch.empty((num_heads, 1, 1), **dd))
        self.cpb_mlp = make_cpb_mlp(num_heads, **dd)
        self.qkv = nn.Linear(dim, dim * 3, bias=False, **dd)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.empty(dim, **dd))
            self.register_buffer("k_bias", torch.empty(dim, **dd), persistent=False)
            self.v_bias = nn.Parameter(torch.empty(dim, **dd))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        wh, ww = self.window_size
        self.register_buffer("relative_coords_table", torch.empty(1, 2 * wh - 1, 2 * ww - 1, 2, **dd),
                             persistent=False)
        self.register_buffer("relative_position_index",
                             torch.empty(wh * ww, wh * ww, device=device, dtype=torch.long), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.logit_scale, math.log(10))
        if self.q_bias is not None:
            nn.init.zeros_(self.q_bias)
            nn.init.zeros_(self.v_bias)
        self._init_buffers()

    def _init_buffers(self) -> None:
        if self.k_bias is not None:
            self.k_bias.zero_()
        w = self.proj.weight
        self.relative_coords_table.copy_(log_spaced_coords_table(self.window_size, self.pretrained_window_size,
                                                                 dtype=w.dtype, device=w.device))
        self.relative_position_index.copy_(relative_position_index(*self.window_size, device=w.device))

    def init_non_persistent_buffers(self) -> None:
        self._init_buffers()

    def qkv_bias(self) -> Optional[torch.Tensor]:
        if self.q_bias is None:
            return None
        return torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))

    def bias_table(self) -> torch.Tensor:
        return continuous_position_bias_table(self.cpb_mlp, self.relative_coords_table, self.num_heads)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
        q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = relative_position_bias(self.bias_table(), self.window_size)
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError("the reference has no attention dropout")
        out = attention_in_windows(q, k, v, 1.0, bias, mask, logit_scale=self.logit_scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B_, N, C)))
