"""ViT attention on CPU tensors, forward and backward, in the layouts the qkv / proj Linears use.

Two implementations, chosen per call:

- *flash* (no dropout, no bias gradient): ATen's blocked CPU flash-attention kernels
  (``_scaled_dot_product_flash_attention_for_cpu`` and its backward). They read q, k, v and the
  bias through their strides, so views into a packed (B, N, 3*H*D) qkv tensor are consumed
  without copies; the output and the gradients come back (B, N, H, D)-backed, which is the
  layout the proj Linear reads and the layout a packed dqkv is assembled from with one copy.
  Memory is O(B*H*N*D): the (N, M) score matrix is never materialised.
- *composed* (dropout, or a bias that needs its gradient): the scores are materialised per call
  (O(B*H*N*M)), because the dropout mask and dbias are per-element anyway. Half-precision
  inputs are computed in fp32 and rounded once at the end.

Both return the log-sum-exp of each row (the only statistic the backward needs). float16,
bfloat16, float32 and float64 are supported; the statistics are fp32 (fp64 for fp64 inputs).

Dropout uses a CPU ``torch.Generator`` seeded with ``seed``: the same seed gives the same mask
in the forward and the backward. (The Triton kernels draw a Philox mask instead; the two
backends are each deterministic per seed but do not draw the same mask.)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the log-sum-exp statistics for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_major(B: int, H: int, N: int, D: int, like: Tensor) -> Tensor:
    """A (B, H, N, D) view backed by a (B, N, H, D) buffer (the layout of every output here)."""
    return torch.empty((B, N, H, D), dtype=like.dtype, device=like.device).transpose(1, 2)


def split_qkv(qkv: Tensor, num_heads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Strided (B, H, N, D) views of q, k, v inside a (B, N, 3*H*D) tensor (no copies)."""
    W = qkv.shape[-1]
    return qkv.unflatten(-1, (3, num_heads, W // (3 * num_heads))).permute(2, 0, 3, 1, 4).unbind(0)


def dropout_keep_mask(seed: int, shape, p: float) -> Tensor:
    """Bool keep-mask (True = kept, probability 1 - p) for ``seed``; the same in forward and
    backward."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.empty(shape, dtype=torch.bool).bernoulli_(1.0 - p, generator=gen)


def _needs_composed(dropout_p: float, bias_requires_grad: bool = False) -> bool:
    return dropout_p > 0.0 or bias_requires_grad


def _flash_mask(bias: Optional[Tensor], shape) -> Optional[Tensor]:
    # The flash kernel reads the mask through its strides: a stride-0 expand costs nothing.
    return None if bias is None else bias.expand(shape)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(q: Tensor, k: Tensor, bias: Optional[Tensor], scale: float) -> Tensor:
    """fp32 (fp64) scaled, biased scores (B, H, N, M)."""
    ct = _compute_dtype(q.dtype)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-2, -1)).mul_(scale)
    if bias is not None:
        s.add_(bias.to(ct))
    return s


# ---------------------------------------------------------------------------------------------
# (B, H, N, D) tensors
# ---------------------------------------------------------------------------------------------
def attention_forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float,
                      dropout_p: float = 0.0, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """``softmax(q k^T * scale + bias) [* keep / (1 - p)] @ v`` -> (out, lse).

    q: (B, H, N, D), k/v: (B, H, M, D), any strides; bias broadcastable to (B, H, N, M).
    out: (B, H, N, D), (B, N, H, D)-backed; lse: (B, H, N) contiguous, fp32 (fp64 for fp64).
    """
    B, H, N, D = q.shape
    M = k.shape[2]
    if not _needs_composed(dropout_p):
        out, lse = _flash_fwd(q, k, v, 0.0, False, attn_mask=_flash_mask(bias, (B, H, N, M)),
                              scale=scale)
        return _as_token_major(out), lse.contiguous()
    s = _scores(q, k, bias, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = s.sub_(lse.unsqueeze(-1)).exp_()
    p.mul_(dropout_keep_mask(seed, (B, H, N, M), dropout_p)).mul_(1.0 / (1.0 - dropout_p))
    out = token_major(B, H, N, D, q)
    out.copy_(torch.matmul(p, v.to(p.dtype)))
    return out, lse.to(stats_dtype(q.dtype))


def _as_token_major(t: Tensor) -> Tensor:
    """``t`` (B, H, N, D) in the (B, N, H, D)-backed layout (no copy when it already is, which
    is how the flash kernels allocate their outputs)."""
    B, H, N, D = t.shape
    s = t.stride()
    if s[3] == 1 and s[1] == D and s[2] == H * D and s[0] == N * H * D:
        return t
    buf = token_major(B, H, N, D, t)
    buf.copy_(t)
    return buf


def reduce_to_shape(grad: Tensor, shape) -> Tensor:
    """Sum a (B, H, N, M) gradient over the dims a bias of ``shape`` was broadcast along."""
    return grad.sum_to_size(tuple(shape)).contiguous()


def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       bias: Optional[Tensor], scale: float, dropout_p: float = 0.0, seed: int = 0,
                       bias_requires_grad: bool = False
                       ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients of :func:`attention_forward` -> (dq, dk, dv, dbias or None).

    dq/dk/dv come (B, N, H, D)-backed like the forward output; dbias has ``bias``'s shape.
    """
    B, H, N, D = q.shape
    M = k.shape[2]
    if not _needs_composed(dropout_p, bias_requires_grad):
        dq, dk, dv = _flash_bwd(do, q, k, v, out, lse, 0.0, False,
                                attn_mask=_flash_mask(bias, (B, H, N, M)), scale=scale)
        return _as_token_major(dq), _as_token_major(dk), _as_token_major(dv), None
    ct = _compute_dtype(q.dtype)
    qc, kc, vc, doc = q.to(ct), k.to(ct), v.to(ct), do.to(ct)
    p = _scores(q, k, bias, scale).sub_(lse.to(ct).unsqueeze(-1)).exp_()
    dp = torch.matmul(doc, vc.transpose(-2, -1))
    if dropout_p > 0.0:
        keep_scaled = dropout_keep_mask(seed, (B, H, N, M), dropout_p).to(ct).mul_(1.0 / (1.0 - dropout_p))
        dv = torch.matmul((p * keep_scaled).transpose(-2, -1), doc)
        dp.mul_(keep_scaled)
    else:
        dv = torch.matmul(p.transpose(-2, -1), doc)
    # rowsum(P * dP) of the dropped-out probabilities equals rowsum(dO * O): no extra pass.
    delta = (doc * out.to(ct)).sum(dim=-1, keepdim=True)
    ds = p.mul_(dp.sub_(delta))
    dq = torch.matmul(ds, kc).mul_(scale)
    dk = torch.matmul(ds.transpose(-2, -1), qc).mul_(scale)
    dbias = reduce_to_shape(ds, bias.shape).to(bias.dtype) if bias_requires_grad else None
    grads = []
    for g, rows in ((dq, N), (dk, M), (dv, M)):
        buf = token_major(B, H, rows, D, q)
        buf.copy_(g)
        grads.append(buf)
    return grads[0], grads[1], grads[2], dbias


# ---------------------------------------------------------------------------------------------
# Packed qkv (B, N, 3*H*D) -> (B, N, H*D)
# ---------------------------------------------------------------------------------------------
def qkv_attention_forward(qkv: Tensor, num_heads: int, bias: Optional[Tensor], scale: float,
                          dropout_p: float = 0.0, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Attention straight from the qkv Linear's output -> (out (B, N, H*D) contiguous, lse)."""
    B, N, W = qkv.shape
    q, k, v = split_qkv(qkv, num_heads)
    out, lse = attention_forward(q, k, v, bias, scale, dropout_p, seed)
    return out.transpose(1, 2).reshape(B, N, W // 3), lse


def qkv_attention_backward(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int,
                           bias: Optional[Tensor], scale: float, dropout_p: float = 0.0,
                           seed: int = 0, bias_requires_grad: bool = False
                           ) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients of :func:`qkv_attention_forward` -> (dqkv (B, N, 3*H*D) contiguous, dbias)."""
    B, N, W = qkv.shape
    H, D = num_heads, W // (3 * num_heads)
    q, k, v = split_qkv(qkv, num_heads)
    do = dout.unflatten(-1, (H, D)).transpose(1, 2)
    o = out.unflatten(-1, (H, D)).transpose(1, 2)
    dq, dk, dv, dbias = attention_backward(do, q, k, v, o, lse, bias, scale, dropout_p, seed,
                                           bias_requires_grad)
    # The three gradients are (B, N, H, D)-backed: stacking on dim 2 writes the packed
    # (B, N, 3, H, D) layout the qkv Linear's backward reads, in one pass.
    dqkv = torch.stack([dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)], dim=2)
    return dqkv.view(B, N, W), dbias
