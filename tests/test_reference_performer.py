"""vitkern.reference.performer against T2T-ViT's Token_performer, and the stabilized definition.

``T2TTokenPerformer`` below is T2T-ViT's layer as published (models/token_performer.py), kept
literal: its prm_exp (with the ``.repeat`` of the squared norm), its einsums, its k, q, v split.
One change: its ``.float()`` casts read ``.to(self.w.dtype)`` so the layer also runs in float64
(for float32 layers, the two are the same).
"""
import math

import pytest
import torch
from torch import nn

from vitkern.reference import performer as ref
from vitkern.testing import assert_close, rel_err


class T2TTokenPerformer(nn.Module):
    def __init__(self, dim, in_dim, head_cnt=1, kernel_ratio=0.5, dp1=0.1, dp2=0.1):
        super().__init__()
        self.emb = in_dim * head_cnt
        self.kqv = nn.Linear(dim, 3 * self.emb)
        self.dp = nn.Dropout(dp1)
        self.proj = nn.Linear(self.emb, self.emb)
        self.head_cnt = head_cnt
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(self.emb)
        self.epsilon = 1e-8
        self.mlp = nn.Sequential(nn.Linear(self.emb, 1 * self.emb), nn.GELU(),
                                 nn.Linear(1 * self.emb, self.emb), nn.Dropout(dp2))
        self.m = int(self.emb * kernel_ratio)
        self.w = torch.randn(self.m, self.emb)
        self.w = nn.Parameter(nn.init.orthogonal_(self.w) * math.sqrt(self.m), requires_grad=False)

    def prm_exp(self, x):
        xd = ((x * x).sum(dim=-1, keepdim=True)).repeat(1, 1, self.m) / 2
        wtx = torch.einsum('bti,mi->btm', x.to(self.w.dtype), self.w)
        return torch.exp(wtx - xd) / math.sqrt(self.m)

    def single_attn(self, x):
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)
        kp, qp = self.prm_exp(k), self.prm_exp(q)
        D = torch.einsum('bti,bi->bt', qp, kp.sum(dim=1)).unsqueeze(dim=2)
        kptv = torch.einsum('bin,bim->bnm', v.to(self.w.dtype), kp)
        y = torch.einsum('bti,bni->btn', qp, kptv) / (D.repeat(1, 1, self.emb) + self.epsilon)
        y = v + self.dp(self.proj(y))
        return y

    def forward(self, x):
        x = self.single_attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


def _pair(dim, in_dim, **kw):
    t2t = T2TTokenPerformer(dim, in_dim, **kw).double().eval()
    mine = ref.TokenPerformer(dim, in_dim, **kw).double().eval()
    mine.load_state_dict(t2t.state_dict(), strict=True)
    return t2t, mine


@pytest.mark.parametrize("dim,in_dim,n,head_cnt", [(147, 64, 49, 1), (36, 24, 50, 2)])
def test_token_performer_matches_t2t(dim, in_dim, n, head_cnt):
    t2t, mine = _pair(dim, in_dim, head_cnt=head_cnt)
    x = torch.randn(2, n, dim, dtype=torch.float64)
    want = t2t(x)
    assert_close(mine(x), want, tol=1e-10)
    # where the formula is finite, the stabilized attention equals it
    assert_close(mine(x, stable=True), want, tol=1e-10)


def test_token_performer_state_dict_is_t2ts():
    t2t, mine = _pair(147, 64)
    assert list(mine.state_dict()) == list(t2t.state_dict())
    assert not mine.w.requires_grad and mine.w.shape == (32, 64)


def test_prm_exp_is_t2ts():
    t2t = T2TTokenPerformer(20, 24).double()
    x = torch.randn(3, 11, 24, dtype=torch.float64)
    assert_close(ref.prm_exp(x, t2t.w), t2t.prm_exp(x), tol=1e-12)
    # float32 inputs are computed in float32, as T2T's x.float()
    assert ref.prm_exp(x.float(), t2t.w.float()).dtype == torch.float32
    assert ref.prm_exp(x.half(), t2t.w.float()).dtype == torch.float32


def _qkv(shape, e=None, scale=0.5, dtype=torch.float64):
    q, k = (torch.randn(*shape, dtype=dtype) * scale for _ in range(2))
    v = torch.randn(*shape[:-1], e or shape[-1], dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("shape,m", [((2, 3, 33, 24), 16), ((1, 50, 40), 100)])
def test_literal_equals_stable_for_moderate_inputs(shape, m):
    q, k, v = _qkv(shape, e=shape[-1] + 8)
    w = ref.orthogonal_projection(m, shape[-1], dtype=torch.float64)
    for eps, fe in [(1e-8, 0.0), (0.0, 1e-4), (1e-3, 1e-3)]:
        assert_close(ref.performer_attention(q, k, v, w, eps, fe),
                     ref.performer_attention_stable(q, k, v, w, eps, fe), tol=1e-12)


@pytest.mark.parametrize("norm", [10.0, 30.0])
def test_stable_reference_at_large_norms(norm):
    q, k, v = _qkv((2, 40, 64))
    q = q / q.norm(dim=-1, keepdim=True) * norm
    k = k / k.norm(dim=-1, keepdim=True) * norm
    w = ref.orthogonal_projection(32, 64, dtype=torch.float64)
    # eps = 0: the literal formula divides underflowed zeros (NaN at |x| = 30); stable is finite
    stable = ref.performer_attention_stable(q, k, v, w, eps=0.0)
    assert torch.isfinite(stable).all()
    literal32 = ref.performer_attention(q.float(), k.float(), v.float(), w.float(), eps=0.0)
    if norm == 30.0:
        assert torch.isnan(literal32).any()
    # a convex combination of the values
    assert (stable.abs().amax() <= v.abs().amax() * (1 + 1e-12))
    # with T2T's eps both agree where the fp64 formula is finite
    literal = ref.performer_attention(q, k, v, w, eps=1e-8)
    stable_eps = ref.performer_attention_stable(q, k, v, w, eps=1e-8)
    assert torch.isfinite(stable_eps).all()
    if norm == 10.0:
        assert_close(stable_eps, literal, tol=1e-10)


def test_eps_term_follows_the_formula():
    # scale q so the eps term is comparable to the denominator: the stabilized form must keep it
    q, k, v = _qkv((1, 30, 24), scale=1.0)
    w = ref.orthogonal_projection(16, 24, dtype=torch.float64)
    q = q * 1.6
    lit = ref.performer_attention(q, k, v, w, eps=1e-8)
    no_eps = ref.performer_attention(q, k, v, w, eps=0.0)
    assert rel_err(lit, no_eps) > 1e-3  # the eps term matters at this scale
    assert_close(ref.performer_attention_stable(q, k, v, w, eps=1e-8), lit, tol=1e-10)


def test_orthogonal_projection():
    g = torch.Generator().manual_seed(3)
    w = ref.orthogonal_projection(32, 64, generator=g, dtype=torch.float64)
    assert_close(w @ w.t(), 32 * torch.eye(32, dtype=torch.float64), tol=1e-12)
    w2 = ref.orthogonal_projection(32, 64, generator=torch.Generator().manual_seed(3),
                                   dtype=torch.float64)
    assert torch.equal(w, w2)
    wide = ref.orthogonal_projection(100, 24, dtype=torch.float64)  # m > d: orthogonal columns
    assert_close(wide.t() @ wide, 100 * torch.eye(24, dtype=torch.float64), tol=1e-12)


def test_gaussian_orthogonal_projection():
    g = torch.Generator().manual_seed(0)
    w = ref.gaussian_orthogonal_projection(100, 24, generator=g, dtype=torch.float64)
    assert w.shape == (100, 24)
    for b in range(4):  # rows of each full block are mutually orthogonal
        blk = w[b * 24:(b + 1) * 24]
        gram = blk @ blk.t()
        off = gram - torch.diag(torch.diagonal(gram))
        assert off.abs().max() < 1e-10 * gram.abs().max()
    norms = w.norm(dim=1)  # chi-distributed with d degrees of freedom: mean ~ sqrt(d)
    assert 3.5 < norms.mean() < 6.0 and norms.std() > 0.1
    fixed = ref.gaussian_orthogonal_projection(30, 24, scaling=1, dtype=torch.float64)
    assert_close(fixed.norm(dim=1), torch.full((30,), math.sqrt(24), dtype=torch.float64),
                 tol=1e-12)
    with pytest.raises(ValueError, match="scaling"):
        ref.gaussian_orthogonal_projection(8, 8, scaling=2)
