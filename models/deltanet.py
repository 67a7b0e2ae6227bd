"""DeltaNet and Gated DeltaNet token mixers, in flash-linear-attention 0.6.0's layer conventions.

DeltaNet      = fla.layers.DeltaNet(use_beta=True, use_gate=False, use_short_conv=True, qk_activation='silu',
                qk_norm='l2', conv_bias=False, expand_k=expand_v=1): q/k/v projections, SiLU short convs, q
                and k L2-normalised per head, beta = sigmoid(b_proj(x)), delta rule, per-head RMSNorm, o_proj.
GatedDeltaNet = fla.layers.GatedDeltaNet(expand_v=1, use_gate=True, use_short_conv=True,
allow_neg_eigval=False):
                as above plus the decay g = -exp(A_log) * softplus(a_proj(x) + dt_bias) (log space) and the
                output gate o_norm(o, g_proj(x)) = rmsnorm(o) * weight * silu(gate).

The mixing itself is `models.ops.delta_rule` on the torch path and fla's `chunk_*delta_rule` kernels on the
fla path (CUDA only; never imported on the CPU path). Both take q, k already L2-normalised by this module
(fla's l2norm: x / sqrt(sum x^2 + 1e-6)), scale = 1/sqrt(head_dim), state (B, H, K, V) in the state dtype.

The decode step (`step`), with autograd off, runs every projection that reads x as one GEMM (cached
concatenated weights) and the q, k, v short convs as one (their cache states are views of one buffer), and on
CUDA the mixing as ONE fla kernel, `fused_recurrent_gated_delta_rule` (forward only; for DeltaNet with no
gate): the q/k L2 norm, beta's sigmoid and Gated DeltaNet's decay -exp(A_log) * softplus(a + dt_bias) are
computed inside it. The torch step (`delta_rule_step`) is the reference beside it and mixes whenever the
kernel is not taken (autograd on, CPU, float64, backend "torch", or the kernel raised once: logged, torch from
then on).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import kernels
from models.base import Operator, state_dtype
from models.common import GatedRMSNorm, RMSNorm, ShortConv, cached_cat, short_conv_step
from models.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent, delta_rule_step

NORM_EPS = 1e-5  # fla's norm_eps default for both layers
L2_EPS = 1e-6  # fla.modules.l2norm default
BACKENDS = ("auto", "torch", "fla")


def l2norm(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """fla's l2norm over the last dim, in at least float32, returned in x's dtype."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    return (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


_FLA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
log = logging.getLogger("hybridnas.deltanet")
_fla_step_failed = (
    False  # set (process-wide) if the fused recurrent kernel raised once: torch steps from then on
)


def joint_conv_state(cache: dict) -> torch.Tensor | None:
    """The (B, 3C, size-1) buffer whose channel blocks are cache["q_conv"], ["k_conv"], ["v_conv"] (as
    `init_cache` makes them), or None if they are separate tensors."""
    q, k, v = cache["q_conv"], cache["k_conv"], cache["v_conv"]
    base = q._base
    if base is None or k._base is not base or v._base is not base or not base.is_contiguous():
        return None
    B, C, S = q.shape
    if tuple(base.shape) != (B, 3 * C, S) or k.shape != q.shape or v.shape != q.shape:
        return None
    step = C * S * base.element_size()
    p = base.data_ptr()
    if (q.data_ptr(), k.data_ptr(), v.data_ptr()) != (p, p + step, p + 2 * step):
        return None
    return base


class _DeltaNetBase(Operator):
    gated = False

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        conv_size: int = 4,
        chunk_size: int = 64,
        backend: str = "auto",
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.conv_size, self.chunk_size = conv_size, chunk_size
        self.backend = backend
        self.last_backend: str | None = None
        inner = n_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)

    def _build_convs_and_output(self, o_norm: nn.Module) -> None:
        """The short convs on q, k, v, the per-head output norm and the output projection (in this order,
        after each layer's own projections, so initialisation draws from the RNG in a fixed order)."""
        inner = self.n_heads * self.head_dim
        self.q_conv = ShortConv(inner, self.conv_size, bias=False, activation=True)
        self.k_conv = ShortConv(inner, self.conv_size, bias=False, activation=True)
        self.v_conv = ShortConv(inner, self.conv_size, bias=False, activation=True)
        self.o_norm = o_norm
        self.o_proj = nn.Linear(inner, self.d_model, bias=False)
        self.share_decode_weights()

    def decode_weight_groups(self):
        convs = (self.q_conv, self.k_conv, self.v_conv)
        return [tuple(p.weight for p in self._in_projections()), tuple(c.weight for c in convs)]

    # -- backend ------------------------------------------------------------------------------------------
    def _kernels(self):
        raise NotImplementedError

    def _resolve(self, x: torch.Tensor):
        """fla kernel tuple for this call, or None for the torch path."""
        if self.backend == "torch":
            return None
        if self.backend == "fla":
            if not x.is_cuda:
                raise RuntimeError(f"{type(self).__name__}(backend='fla') needs CUDA tensors")
            if x.dtype not in _FLA_DTYPES:
                raise RuntimeError(f"{type(self).__name__}(backend='fla') does not take {x.dtype}")
            kern = self._kernels()
            if kern is None:
                raise RuntimeError(f"{type(self).__name__}(backend='fla'): fla kernels unavailable")
            return kern
        if x.is_cuda and x.dtype in _FLA_DTYPES:  # auto
            return self._kernels()
        return None

    # -- shared pieces ------------------------------------------------------------------------------------
    def _qkv(self, x: torch.Tensor, cache: dict | None):
        """x (B, T, d) -> q, k (L2-normalised), v as (B, T, H, hd)."""
        B, T, _ = x.shape
        H, hd = self.n_heads, self.head_dim
        get = (lambda name: None) if cache is None else cache.__getitem__
        q = self.q_conv(self.q_proj(x), get("q_conv"))
        k = self.k_conv(self.k_proj(x), get("k_conv"))
        v = self.v_conv(self.v_proj(x), get("v_conv"))
        q, k, v = (t.reshape(B, T, H, hd) for t in (q, k, v))
        return l2norm(q), l2norm(k), v

    def _in_projections(self) -> tuple[nn.Linear, ...]:
        """Every projection that reads x, in the order of the decode step's one GEMM (q, k, v first)."""
        raise NotImplementedError

    def _step_inputs(self, x: torch.Tensor, cache: dict):
        """One token x (B, d) -> q, k, v (B, H, hd) after the short convs (not normalised) and the raw outputs
        of the other projections (`_in_projections()[3:]`), each (B, out). Updates the conv states in
        place."""
        B = x.shape[0]
        H, hd = self.n_heads, self.head_dim
        inner = H * hd
        projs = self._in_projections()
        if torch.is_grad_enabled():
            q = self.q_conv.step(self.q_proj(x), cache["q_conv"])
            k = self.k_conv.step(self.k_proj(x), cache["k_conv"])
            v = self.v_conv.step(self.v_proj(x), cache["v_conv"])
            rest = [p(x) for p in projs[3:]]
        else:
            z = F.linear(x, cached_cat(self, "in_proj", (p.weight for p in projs)))
            qkv, *rest = z.split([3 * inner] + [p.out_features for p in projs[3:]], dim=-1)
            joint = joint_conv_state(cache)
            if joint is not None:  # the three convs as one, on the concatenated channels
                convs = (self.q_conv, self.k_conv, self.v_conv)
                w = cached_cat(self, "conv", (c.weight for c in convs)).squeeze(1)
                q, k, v = short_conv_step(qkv, joint, w, None, True).split(inner, dim=-1)
            else:
                q = self.q_conv.step(qkv[:, :inner], cache["q_conv"])
                k = self.k_conv.step(qkv[:, inner : 2 * inner], cache["k_conv"])
                v = self.v_conv.step(qkv[:, 2 * inner :], cache["v_conv"])
        return q.reshape(B, H, hd), k.reshape(B, H, hd), v.reshape(B, H, hd), rest

    def _step_kernel(self, x: torch.Tensor, cache: dict):
        """fla's fused recurrent kernel for this decode step, or None for the torch step."""
        if (
            self.backend == "torch"
            or _fla_step_failed
            or not x.is_cuda
            or x.dtype not in _FLA_DTYPES
            or torch.is_grad_enabled()
            or cache["state"].dtype != torch.float32
        ):
            return None
        return kernels.fla_recurrent_step()

    def _fla_step(self, kern, q, k, v, rest, state: torch.Tensor) -> torch.Tensor:
        """The fused recurrent kernel on one token: q, k (B, H, K) un-normalised, v (B, H, V), the raw b (and
        a) projections; state (B, H, K, V) float32 updated. Returns o (B, H, V) in v's dtype."""
        raise NotImplementedError

    def _beta_g(self, x: torch.Tensor):
        raise NotImplementedError

    def _out(self, o: torch.Tensor, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _fla_mix(self, kern, q, k, v, beta, g, initial_state, want_state: bool):
        raise NotImplementedError

    def init_cache(self, batch: int, max_len: int, device, dtype) -> dict:
        # One buffer for the three conv states (views, same bytes): the decode step runs the convs as one.
        inner = self.n_heads * self.head_dim
        conv = torch.zeros(batch, 3 * inner, self.conv_size - 1, device=device, dtype=dtype)
        return {
            "q_conv": conv[:, :inner],
            "k_conv": conv[:, inner : 2 * inner],
            "v_conv": conv[:, 2 * inner :],
            "state": torch.zeros(
                batch, self.n_heads, self.head_dim, self.head_dim, device=device, dtype=state_dtype(dtype)
            ),
        }

    # -- the three forms ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cache: dict | None = None, start: int = 0) -> torch.Tensor:
        q, k, v = self._qkv(x, cache)
        beta, g = self._beta_g(x)
        # The cache is overwritten below, after autograd may have saved the initial state: pass a copy.
        h0 = None if cache is None else cache["state"].clone()
        kern = self._resolve(x)
        if kern is not None:
            o, ht = self._fla_mix(kern, q, k, v, beta, g, h0, cache is not None)
            self.last_backend = "fla"
        else:
            o, ht = delta_rule_chunked(q, k, v, beta, g, initial_state=h0, chunk_size=self.chunk_size)
            self.last_backend = "torch"
        if cache is not None:
            cache["state"].copy_(ht.detach())
        return self._out(o, x)

    def step(self, x: torch.Tensor, cache: dict, pos: torch.Tensor) -> torch.Tensor:
        # One token (static shapes, in-place state, no host sync; CUDA-graph capturable).
        global _fla_step_failed
        q, k, v, rest = self._step_inputs(x, cache)
        kern = self._step_kernel(x, cache)
        o = None
        if kern is not None:
            try:
                o = self._fla_step(kern, q, k, v, rest, cache["state"])
                self.last_backend = "fla"
            except Exception as exc:
                if x.is_cuda and torch.cuda.is_current_stream_capturing():
                    raise
                msg = (str(exc).strip().splitlines() or [""])[0][:200]
                log.warning(
                    "fla fused recurrent decode step failed (%s: %s): decode steps use the torch "
                    "recurrence from now on",
                    type(exc).__name__,
                    msg,
                )
                _fla_step_failed = True
        if o is None:
            beta, g = self._gates(*rest)
            o = delta_rule_step(l2norm(q), l2norm(k), v, beta, cache["state"], g)
            self.last_backend = "torch"
        gate = rest[0] if self.gated else None
        return self._out(o.unsqueeze(1), x.unsqueeze(1), None if gate is None else gate.unsqueeze(1)).squeeze(
            1
        )

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same function, token by token with the recurrent reference (differentiable, no cache)."""
        q, k, v = self._qkv(x, None)
        beta, g = self._beta_g(x)
        o, _ = delta_rule_recurrent(q, k, v, beta, g)
        return self._out(o, x)


class DeltaNet(_DeltaNetBase):
    """DeltaNet token mixer (fla's DeltaNet layer, qk_norm='l2', short convs, beta, no output gate)."""

    gated = False

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        conv_size: int = 4,
        chunk_size: int = 64,
        backend: str = "auto",
    ):
        super().__init__(d_model, n_heads, head_dim, conv_size, chunk_size, backend)
        self.b_proj = nn.Linear(d_model, n_heads, bias=False)
        self._build_convs_and_output(RMSNorm(head_dim, eps=NORM_EPS))

    def _kernels(self):
        return kernels.fla_delta_rule()

    def _in_projections(self):
        return self.q_proj, self.k_proj, self.v_proj, self.b_proj

    def _gates(self, b):
        return b.sigmoid(), None

    def _beta_g(self, x):
        return self._gates(self.b_proj(x))

    def _fla_step(self, kern, q, k, v, rest, state):
        (b,) = rest
        B, H, hd = q.shape
        o, ht = kern(
            q=q.view(B, 1, H, hd),
            k=k.view(B, 1, H, hd),
            v=v.reshape(B, 1, H, -1),
            beta=b.view(B, 1, H),
            scale=hd**-0.5,
            initial_state=state,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            use_beta_sigmoid_in_kernel=True,
        )
        state.copy_(ht)
        return o.view(B, H, -1)

    def _out(self, o, x, gate=None):
        o = self.o_norm(o)
        return self.o_proj(o.reshape(*o.shape[:-2], -1))

    def _fla_mix(self, kern, q, k, v, beta, g, initial_state, want_state):
        chunk_delta_rule, fused_recurrent_delta_rule = kern
        # fla 0.6.0's ChunkDeltaRuleFunction refuses float32 inputs; float32 takes the fused recurrent kernel
        # (float32 throughout, with a backward). Both: q, k, v (B, T, H, K|V), beta (B, T, H), state (B, H, K,
        # V) in float32; returns (o in q's dtype, final state float32 or None).
        fn = fused_recurrent_delta_rule if q.dtype == torch.float32 else chunk_delta_rule
        beta = beta.to(q.dtype)
        h0 = None if initial_state is None else initial_state.float()
        return fn(
            q=q,
            k=k,
            v=v,
            beta=beta,
            scale=self.head_dim**-0.5,
            initial_state=h0,
            output_final_state=want_state,
            use_qk_l2norm_in_kernel=False,
        )


class GatedDeltaNet(_DeltaNetBase):
    """Gated DeltaNet token mixer (fla's GatedDeltaNet layer, expand_v=1, output gate, short convs)."""

    gated = True

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        conv_size: int = 4,
        chunk_size: int = 64,
        backend: str = "auto",
    ):
        super().__init__(d_model, n_heads, head_dim, conv_size, chunk_size, backend)
        inner = n_heads * head_dim
        self.a_proj = nn.Linear(d_model, n_heads, bias=False)
        self.b_proj = nn.Linear(d_model, n_heads, bias=False)
        # As fla: A ~ U(0, 16), A_log = log A; dt log-uniform in [1e-3, 1e-1] (floor 1e-4), dt_bias =
        # softplus^-1.
        A = torch.empty(n_heads, dtype=torch.float32).uniform_(0, 16)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        dt_min, dt_max, dt_init_floor = 0.001, 0.1, 1e-4
        dt = torch.exp(torch.rand(n_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True
        self.g_proj = nn.Linear(d_model, inner, bias=False)
        self._build_convs_and_output(GatedRMSNorm(head_dim, eps=NORM_EPS, norm_before_gate=True))

    def _kernels(self):
        return kernels.fla_gated_delta_rule(need_backward=torch.is_grad_enabled())

    def _in_projections(self):
        return self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.b_proj, self.a_proj

    def _gates(self, gate, b, a):
        beta = b.sigmoid()
        ct = state_dtype(a.dtype)
        g = -self.A_log.to(ct).exp() * F.softplus(a.to(ct) + self.dt_bias.to(ct))
        return beta, g

    def _beta_g(self, x):
        return self._gates(None, self.b_proj(x), self.a_proj(x))

    def _fla_step(self, kern, q, k, v, rest, state):
        _gate, b, a = rest
        B, H, hd = q.shape
        # The decay from the raw a inside the kernel: g = -exp(A_log) * softplus(a + dt_bias), in float32.
        o, ht = kern(
            q=q.view(B, 1, H, hd),
            k=k.view(B, 1, H, hd),
            v=v.reshape(B, 1, H, -1),
            g=a.view(B, 1, H),
            beta=b.view(B, 1, H),
            scale=hd**-0.5,
            initial_state=state,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            use_gate_in_kernel=True,
            A_log=self.A_log,
            dt_bias=self.dt_bias,
            use_beta_sigmoid_in_kernel=True,
        )
        state.copy_(ht)
        return o.view(B, H, -1)

    def _out(self, o, x, gate=None):
        if gate is None:
            gate = self.g_proj(x)
        o = self.o_norm(o, gate.reshape(*gate.shape[:-1], self.n_heads, self.head_dim))
        return self.o_proj(o.reshape(*o.shape[:-2], -1))

    def _fla_mix(self, kern, q, k, v, beta, g, initial_state, want_state):
        chunk_gated_delta_rule, _fused_recurrent = kern
        # fla 0.6.0: q, k, v (B, T, H, K|V), g (B, T, H) log-space decay (use_gate_in_kernel=False, float32),
        # beta (B, T, H) post-sigmoid (use_beta_sigmoid_in_kernel=False), state (B, H, K, V) float32
        # (state_v_first=False). Returns (o in q's dtype, final state float32 or None).
        h0 = None if initial_state is None else initial_state.float()
        return chunk_gated_delta_rule(
            q=q,
            k=k,
            v=v,
            g=g.float(),
            beta=beta.to(q.dtype),
            scale=self.head_dim**-0.5,
            initial_state=h0,
            output_final_state=want_state,
            use_qk_l2norm_in_kernel=False,
            use_beta_sigmoid_in_kernel=False,
            state_v_first=False,
        )
