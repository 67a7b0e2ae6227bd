"""Mamba2 token mixer, following mamba_ssm 2.3.2's `modules/mamba2.py` (rmsnorm=True, norm_before_gate=False,
D per head, no dt_limit, no d_mlp), so that its Triton SSD kernel and the pure-torch path compute one
function.

    u -> in_proj -> [z | xBC | dt]
    xBC -> causal depthwise conv (+bias) -> SiLU -> [x | B | C]
    dt -> softplus(dt + dt_bias);  A = -exp(A_log)
    y = SSD(x, dt, A, B, C) + D x
    y = RMSNorm(y * silu(z)) (per group of d_inner / n_groups channels, eps 1e-5) -> out_proj

Backends (`self.backend`): "torch" (models.ops.ssd, chunked), "mamba_ssm" (`mamba_chunk_scan_combined` for the
parallel form), "auto" (mamba_ssm when x is a CUDA half/bf16/fp32 tensor and the kernel loads, else torch).
Decode (`step`) always uses the torch `ssd_step`. `self.last_backend` records the path the last call took.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import kernels
from models.base import Operator, state_dtype
from models.common import GatedRMSNorm, ShortConv
from models.ops.ssd import ssd_chunked, ssd_recurrent, ssd_step

_BACKENDS = ("auto", "torch", "mamba_ssm")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Mamba2(Operator):
    def __init__(
        self,
        d_model: int,
        expand: int = 2,
        head_dim: int = 64,
        d_state: int = 128,
        conv_size: int = 4,
        n_groups: int = 1,
        chunk_size: int = 64,
        backend: str = "auto",
        kernel_chunk_size: int = 256,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.d_model, self.expand, self.head_dim, self.d_state = d_model, expand, head_dim, d_state
        self.conv_size, self.n_groups, self.chunk_size = conv_size, n_groups, chunk_size
        self.kernel_chunk_size = kernel_chunk_size
        self.d_inner = expand * d_model
        if self.d_inner % head_dim:
            raise ValueError(f"d_inner {self.d_inner} not divisible by head_dim {head_dim}")
        self.nheads = self.d_inner // head_dim
        if self.nheads % n_groups or self.d_inner % n_groups:
            raise ValueError(f"nheads {self.nheads} not divisible by n_groups {n_groups}")
        self.backend = backend
        self.last_backend: str | None = None

        di, GN, nh = self.d_inner, n_groups * d_state, self.nheads
        self.conv_dim = di + 2 * GN
        # Order: [z, xBC, dt] with xBC = [x, B, C], as mamba_ssm.
        self.in_proj = nn.Linear(d_model, 2 * di + 2 * GN + nh, bias=False)
        self.conv = ShortConv(self.conv_dim, conv_size, bias=True, activation=True)

        # dt bias: inverse softplus of dt ~ log-uniform [dt_min, dt_max] (floored), as mamba_ssm.
        dt = torch.exp(torch.rand(nh) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True
        A = torch.empty(nh, dtype=torch.float32).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(nh))
        self.D._no_weight_decay = True

        self.norm = GatedRMSNorm(di, eps=norm_eps)
        self.out_proj = nn.Linear(di, d_model, bias=False)

    # ---- helpers -------------------------------------------------------------------------------------------
    def _resolve_backend(self, x: torch.Tensor) -> str:
        if self.backend == "torch":
            return "torch"
        if self.backend == "mamba_ssm":
            if not x.is_cuda or kernels.mamba_ssd() is None:
                raise RuntimeError("backend='mamba_ssm' needs a CUDA tensor and the mamba_ssm SSD kernel")
            return "mamba_ssm"
        if x.is_cuda and x.dtype in _KERNEL_DTYPES and kernels.mamba_ssd() is not None:
            return "mamba_ssm"
        return "torch"

    def _split_in(self, zxbcdt: torch.Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _split_xbc(self, xBC: torch.Tensor):
        GN = self.n_groups * self.d_state
        return torch.split(xBC, [self.d_inner, GN, GN], dim=-1)

    def _dt_A(self, dt: torch.Tensor):
        """softplus(dt + dt_bias) and A = -exp(A_log), in at least float32 (as the kernel computes them)."""
        ct = state_dtype(dt.dtype)
        dt = F.softplus(dt.to(ct) + self.dt_bias.to(ct))
        A = -torch.exp(self.A_log.to(ct))
        return dt, A

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """mamba_ssm's RMSNormGated(norm_before_gate=False, group_size=d_inner // n_groups)."""
        if self.n_groups == 1:
            return self.norm(y, z)
        dtype = y.dtype
        ct = torch.promote_types(dtype, torch.float32)
        h = y.to(ct) * F.silu(z.to(ct))
        hg = h.unflatten(-1, (self.n_groups, self.d_inner // self.n_groups))
        hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + self.norm.eps)
        return hg.flatten(-2).to(dtype) * self.norm.weight

    def _pre_ssd(self, x: torch.Tensor, conv_state: torch.Tensor | None):
        Bsz, T, _ = x.shape
        z, xBC, dt = self._split_in(self.in_proj(x))
        xBC = self.conv(xBC, conv_state)
        xs, Bm, Cm = self._split_xbc(xBC)
        xs = xs.reshape(Bsz, T, self.nheads, self.head_dim)
        Bm = Bm.reshape(Bsz, T, self.n_groups, self.d_state)
        Cm = Cm.reshape(Bsz, T, self.n_groups, self.d_state)
        return z, xs, Bm, Cm, dt

    def _post_ssd(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = y.reshape(*y.shape[:-2], self.d_inner)
        return self.out_proj(self._gated_norm(y, z))

    # ---- Operator interface --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cache: dict | None = None, start: int = 0) -> torch.Tensor:
        backend = self._resolve_backend(x)
        self.last_backend = backend
        z, xs, Bm, Cm, dt = self._pre_ssd(x, None if cache is None else cache["conv"])
        init = None if cache is None else cache["ssm"]
        if backend == "mamba_ssm":
            scan = kernels.mamba_ssd()
            if init is not None and torch.is_grad_enabled():
                init = init.clone()  # the kernel saves it for backward; the cache is overwritten below
            A = -torch.exp(self.A_log.float())
            out = scan(
                xs,
                dt,
                A,
                Bm,
                Cm,
                self.kernel_chunk_size,
                D=self.D,
                z=None,
                dt_bias=self.dt_bias,
                initial_states=init,
                dt_softplus=True,
                return_final_states=cache is not None,
            )
            if cache is not None:
                y, final = out
                cache["ssm"].copy_(final)
            else:
                y = out
        else:
            dtp, A = self._dt_A(dt)
            y, final = ssd_chunked(
                xs, dtp, A, Bm, Cm, D=self.D, initial_state=init, chunk_size=self.chunk_size
            )
            if cache is not None:
                cache["ssm"].copy_(final)
        return self._post_ssd(y, z)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as `forward(x)`, by the token-by-token recurrence (differentiable, no cache)."""
        z, xs, Bm, Cm, dt = self._pre_ssd(x, None)
        dtp, A = self._dt_A(dt)
        y, _ = ssd_recurrent(xs, dtp, A, Bm, Cm, D=self.D)
        return self._post_ssd(y, z)

    def step(self, x: torch.Tensor, cache: dict, pos: torch.Tensor) -> torch.Tensor:
        self.last_backend = "torch"
        Bsz = x.shape[0]
        z, xBC, dt = self._split_in(self.in_proj(x))
        xBC = self.conv.step(xBC, cache["conv"])
        xs, Bm, Cm = self._split_xbc(xBC)
        dtp, A = self._dt_A(dt)
        y = ssd_step(
            xs.reshape(Bsz, self.nheads, self.head_dim),
            dtp,
            A,
            Bm.reshape(Bsz, self.n_groups, self.d_state),
            Cm.reshape(Bsz, self.n_groups, self.d_state),
            cache["ssm"],
            D=self.D,
        )
        return self._post_ssd(y, z)

    def init_cache(self, batch: int, max_len: int, device, dtype) -> dict:
        return {
            "conv": self.conv.init_state(batch, device, dtype),
            "ssm": torch.zeros(
                batch, self.nheads, self.head_dim, self.d_state, device=device, dtype=state_dtype(dtype)
            ),
        }
