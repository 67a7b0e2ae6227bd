"""Detection of the optional GPU kernels (fla, mamba_ssm's Triton SSD, causal_conv1d).

Each loader returns the kernel functions or None, and logs one clear line the first time a kernel path is
unavailable, so a fallback to the pure-torch path is never silent. Nothing here is imported on the CPU path
unless asked.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import sys
import types

import torch
from packaging.version import Version

log = logging.getLogger("hybridnas.kernels")


def cuda_ready() -> bool:
    return torch.cuda.is_available()


@functools.cache
def fla_delta_rule():
    """(chunk_delta_rule, fused_recurrent_delta_rule) from fla, or None."""
    if not cuda_ready():
        return None
    try:
        from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule
    except Exception as exc:  # ImportError, or Triton refusing at import
        log.warning("fla delta-rule kernels unavailable (%s): using the pure-torch chunked path", exc)
        return None
    return chunk_delta_rule, fused_recurrent_delta_rule


@functools.cache
def fla_gated_delta_rule(need_backward: bool = True):
    """(chunk_gated_delta_rule, fused_recurrent_gated_delta_rule) from fla, or None.

    fla 0.6.0 refuses the gated backward on Hopper with Triton >= 3.4, < 3.7.1 (gpu-notes.md); the forward
    works there, so a forward-only use (latency) may still take the kernel.
    """
    if not cuda_ready():
        return None
    try:
        import triton
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception as exc:
        log.warning("fla gated delta-rule kernels unavailable (%s): using the pure-torch chunked path", exc)
        return None
    major, _minor = torch.cuda.get_device_capability()
    triton_version = Version(triton.__version__).release
    if need_backward and major == 9 and (3, 4) <= triton_version < (3, 7, 1):
        log.warning(
            "fla gated delta-rule backward refuses Triton %s on Hopper (needs >= 3.7.1): "
            "training uses the pure-torch chunked path",
            triton.__version__,
        )
        return None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


STEP_KERNEL_ARGS = (
    "g",
    "beta",
    "scale",
    "initial_state",
    "output_final_state",
    "use_qk_l2norm_in_kernel",
    "use_gate_in_kernel",
    "A_log",
    "dt_bias",
    "use_beta_sigmoid_in_kernel",
)


@functools.cache
def fla_recurrent_step():
    """fla's `fused_recurrent_gated_delta_rule` for the one-token decode step of DeltaNet (g=None) and Gated
    DeltaNet, or None. Forward only (its backward is not implemented), so no Hopper/Triton restriction
    applies. Needs the fla >= 0.6 arguments that put the q/k L2 norm, beta's sigmoid and the gated decay in
    the kernel."""
    if not cuda_ready():
        return None
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
    except Exception as exc:
        log.warning(
            "fla fused recurrent kernel unavailable (%s): DeltaNet decode steps use the torch recurrence", exc
        )
        return None
    try:
        params = inspect.signature(fused_recurrent_gated_delta_rule).parameters
    except (TypeError, ValueError):
        params = {}
    missing = [name for name in STEP_KERNEL_ARGS if name not in params]
    if missing:
        log.warning(
            "fla fused_recurrent_gated_delta_rule lacks %s: DeltaNet decode steps use the torch recurrence",
            ", ".join(missing),
        )
        return None
    return fused_recurrent_gated_delta_rule


@functools.cache
def mamba_ssd():
    """mamba_ssm's Triton `mamba_chunk_scan_combined`, importing around the package __init__ (which needs the
    compiled selective_scan_cuda extension), or None."""
    if not cuda_ready():
        return None
    try:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None:
            raise ImportError("mamba_ssm not installed")
        if "mamba_ssm" not in sys.modules:
            pkg = types.ModuleType("mamba_ssm")
            pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules["mamba_ssm"] = pkg
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as exc:
        log.warning("mamba_ssm SSD kernel unavailable (%s): using the pure-torch chunked SSD", exc)
        return None
    return mamba_chunk_scan_combined


def kernel_versions() -> dict[str, str | None]:
    """Versions of the kernel libraries present, for device fingerprints."""
    out: dict[str, str | None] = {"torch": torch.__version__}
    for name in ("triton", "fla", "mamba_ssm", "causal_conv1d"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            out[name] = None
            continue
        try:
            from importlib.metadata import version

            dist = {"fla": "fla-core", "mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d"}.get(
                name, name
            )
            out[name] = version(dist)
        except Exception:
            out[name] = "unknown"
    return out
