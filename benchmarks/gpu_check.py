"""GPU check of the model zoo and the latency profiler (one process, one CUDA device, ~8 minutes on an
H100/H200).

    PYTHONPATH=. python3 benchmarks/gpu_check.py [--out DIR] [--anchor PATH/gpu_anchor.py] [--steps
    env,decode,...] (on the GPU machine, with the wheels in .whl/:  bash .whl/run_gpu_check.sh)

Steps (each guarded: a failure is recorded with its traceback and the next step runs; results are rewritten to
DIR/gpu_check.json and DIR/gpu_check.md after every step, so a run cut short still leaves what it measured):
  env     torch / triton / fla / mamba_ssm versions, device, which kernel paths load.
  decode  batch-1 decode ms/token at the anchor's shapes (12 layers, d 1024, 16 heads x 64, SwiGLU 2816,
          vocab 32000, untied, bf16, start 1024, 256 steps): the anchor's own TinyLM (`decode_latency` of
          ../shared/bench/gpu_anchor.py, KV buffer 4096) beside our HybridLM in the same process: our own
          anchor-style loop at the same 4096-token buffer (eager and one CUDA graph, with RoPE and without),
          and `latency.profiler.profile` (its buffer is prompt_len + decode_tokens = 1280 tokens). Ratio
          ours / anchor of the CUDA-graph ms/token; target <= 1.2. For "llama12" and the "daddaddaddad"
          hybrid.
  parity  every mixer (attention, swa, mamba2, deltanet, gated_deltanet) at B=2, T=777 (not a multiple of any
          chunk size), d_model 1024, on the same weights: backend "auto" (the kernel; `last_backend` recorded)
          against backend "torch", float32 forward and gradients (input and every parameter); float32
          forward without grad (the forward-only kernel choice); bf16 forward (bf16 weights) against the
          float32 torch path; the torch path against the module's `forward_reference`.
  hybrid  a HybridLM with every mixer: prefill (fresh, then continued at start > 0) + decode steps against the
          parallel forward of the same tokens, float32 and bf16.
  lut     if `latency/lut.py` exists: a small GPU LUT (`build_lut`: width 1024, context 1024, every operator),
          and `confirm` (the table's prediction against a direct measurement) on four layouts. Skipped
          otherwise.

Imports only the standard library, torch and the project (search/, models/, latency/). Without CUDA it writes
a "not run: no GPU" result and exits 0. Relative errors are max|a - b| / max|b| over the whole tensor.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIXERS = ("attention", "swa", "mamba2", "deltanet", "gated_deltanet")
# The kernel path `backend="auto"` should take on CUDA (None: no separate kernel, SDPA on both paths).
EXPECTED_KERNEL = {
    "attention": None,
    "swa": "flex",
    "mamba2": "mamba_ssm",
    "deltanet": "fla",
    "gated_deltanet": "fla",
}
# Relative-error tolerances (max|a - b| / max|b|). Triton kernels use TF32 dots for float32 inputs, hence
# float32 tolerances above float32 rounding.
TOL = {
    "fp32_out": 2e-3,
    "fp32_grad": 5e-3,
    "bf16_out": 3e-2,
    "reference": 1e-3,
    "hybrid_fp32": 5e-3,
    "hybrid_bf16": 5e-2,
}
DEFAULT_STEPS = ("env", "decode", "parity", "hybrid", "lut")

# Parity shapes: heads / widths as the decode models, so Triton autotuning (keyed on H, K, V, dtype, not T) is
# shared between the steps.
PARITY_DIMS = dict(
    d_model=1024,
    n_heads=16,
    n_kv_heads=4,
    head_dim=64,
    swa_window=256,
    meta_tokens=4,
    mamba_head_dim=64,
    mamba_d_state=128,
    mamba_expand=2,
    conv_size=4,
    ffn_ratio=2.75,
)
# The anchor's decode models (gpu_anchor.py TinyLM): MHA 16 x 64, SwiGLU 2816 = 2.75 x 1024, untied, no RoPE.
ANCHOR_DIMS = dict(
    d_model=1024, n_heads=16, n_kv_heads=16, head_dim=64, ffn_ratio=2.75, tied_embeddings=False, meta_tokens=0
)
ANCHOR_MODELS = {"llama12_d1024": "a" * 12, "hybrid12_d1024_4a8delta": "daddaddaddad"}
ANCHOR_VOCAB, ANCHOR_BUFFER, ANCHOR_START, ANCHOR_STEPS = 32000, 4096, 1024, 256


# ------------------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _g(x: float | None) -> float | None:
    """Round for reports (3 significant digits)."""
    if x is None:
        return None
    if x != x or x in (float("inf"), float("-inf")):
        return x
    return float(f"{x:.3g}")


def rel_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """max|a - b| / max|b| over the tensor (inf if a is not finite, None if either is missing)."""
    if a is None or b is None:
        return None
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / max(scale, 1e-30) if b.numel() else 0.0


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _guard(fn, *args, **kwargs) -> dict:
    """Run fn, returning its dict, or {'error', 'traceback'} if it raised."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # report and go on
        return {"error": f"{type(exc).__name__}: {exc}"[:800], "traceback": traceback.format_exc()[-3000:]}


class Run:
    """Progress log with timestamps, results per step, the output files rewritten after every step."""

    def __init__(self, out_dir: Path, command: str, budget_s: float):
        self.out_dir, self.command, self.budget_s = out_dir, command, budget_s
        self.t0 = time.time()
        self.meta = {
            "date": _now(),
            "command": command,
            "budget_s": budget_s,
            "python": platform.python_version(),
            "host": platform.node(),
        }
        self.steps: dict[str, dict] = {}

    def elapsed(self) -> float:
        return time.time() - self.t0

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{self.elapsed():6.1f}s] {msg}", flush=True)

    def step(self, name: str, fn, *args, min_s: float = 0.0, **kwargs) -> None:
        if self.remaining() < min_s:
            self.steps[name] = {
                "status": "skipped",
                "reason": f"time budget: {self.remaining():.0f}s left of "
                f"{self.budget_s:.0f}s, needs ~{min_s:.0f}s",
            }
            self.log(f"step {name}: skipped (time budget)")
            self.write()
            return
        self.log(f"step {name}: start")
        t0 = time.time()
        try:
            result = fn(self, *args, **kwargs)
            entry = {"status": "ok", "result": result}
        except Exception as exc:
            entry = {
                "status": "error",
                "error": f"{type(exc).__name__}: {exc}"[:800],
                "traceback": traceback.format_exc()[-4000:],
            }
            self.log(f"step {name}: ERROR {entry['error']}")
        entry["wall_s"] = round(time.time() - t0, 1)
        self.steps[name] = entry
        self.log(f"step {name}: done in {entry['wall_s']}s")
        if torch.cuda.is_available():
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as exc:  # a sticky CUDA error: record it, later steps will fail visibly
                entry.setdefault("cuda_error_after", f"{type(exc).__name__}: {exc}"[:400])
        self.write()

    def to_dict(self) -> dict:
        return {
            "meta": {**self.meta, "elapsed_s": round(self.elapsed(), 1)},
            "tolerances": TOL,
            "steps": self.steps,
        }

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        (self.out_dir / "gpu_check.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        (self.out_dir / "gpu_check.md").write_text(render_markdown(data))


# ------------------------------------------------------------------------------------------------------------
# 1. Environment
# ------------------------------------------------------------------------------------------------------------


def step_env(run: Run) -> dict:
    from models import kernels

    out: dict = {
        "versions": kernels.kernel_versions(),
        "python": platform.python_version(),
        "cuda_runtime": torch.version.cuda,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_GiB=round(props.total_memory / 2**30, 1),
        )
    paths = {
        "fla_delta_rule": kernels.fla_delta_rule() is not None,
        "fla_gated_delta_rule(forward only)": kernels.fla_gated_delta_rule(need_backward=False) is not None,
        "fla_gated_delta_rule(with backward)": kernels.fla_gated_delta_rule(need_backward=True) is not None,
        "mamba_ssd": kernels.mamba_ssd() is not None,
    }
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        paths["flex_attention"] = True
    except Exception as exc:
        paths["flex_attention"] = f"unavailable: {exc}"[:200]
    out["kernel_paths"] = paths
    for name in ("einops", "packaging"):
        out[f"has_{name}"] = importlib.util.find_spec(name) is not None
    run.log(f"env: {json.dumps(out)}")
    return out


# ------------------------------------------------------------------------------------------------------------
# 2. Parity: kernel path vs torch path on the same weights
# ------------------------------------------------------------------------------------------------------------


def parity_layout(dims: dict, operators: str = "A F S F M2 F D F GD F"):
    from search.layout import Layout

    return Layout.from_dict({"operators": operators, **dims})


def mixer_parity(
    name: str,
    device="cuda",
    *,
    dims: dict | None = None,
    batch: int = 2,
    seqlen: int = 777,
    kernel_backend: str = "auto",
    ref_backend: str = "torch",
    grads: bool = True,
    bf16: bool = True,
    reference: bool = True,
    seed: int = 0,
    log=print,
) -> dict:
    """One mixer, one set of weights: `kernel_backend` against `ref_backend` (float32 forward + gradients,
    float32 no-grad forward), bf16 forward against the float32 `ref_backend` path, and `ref_backend` against
    `forward_reference`. On CPU with "torch" vs "torch" it only exercises the code paths."""
    from models.registry import build_operator

    dims = dict(PARITY_DIMS if dims is None else dims)
    layout = parity_layout(dims)
    torch.manual_seed(seed)
    op = build_operator(name, layout, backend=ref_backend).to(device=device, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, seqlen, layout.d_model, generator=gen).to(device)
    w = torch.randn(batch, seqlen, layout.d_model, generator=gen).to(device)
    names = [n for n, _ in op.named_parameters()]
    out: dict = {
        "mixer": name,
        "device": str(device),
        "shape": f"B{batch} T{seqlen} d{layout.d_model}",
        "kernel_backend": kernel_backend,
        "ref_backend": ref_backend,
        "expected_kernel": EXPECTED_KERNEL.get(name) if torch.device(device).type == "cuda" else None,
    }

    def run_fwd(module, backend, dtype, with_grad):
        module.backend = backend
        xx = x.to(dtype).detach().requires_grad_(with_grad)
        if with_grad:
            y = module(xx)
            loss = (y.float() * w).sum()
            gr = torch.autograd.grad(loss, [xx, *module.parameters()], allow_unused=True)
            _sync(device)
            return y.detach(), gr, module.last_backend
        with torch.no_grad():
            y = module(xx)
        _sync(device)
        return y, None, module.last_backend

    ref_cache: dict = {}

    def ref_fp32_fwd():
        if "y" not in ref_cache:
            ref_cache["y"] = run_fwd(op, ref_backend, torch.float32, False)[0]
        return ref_cache["y"]

    def check_fp32_grad():
        yk, gk, path = run_fwd(op, kernel_backend, torch.float32, True)
        yr, gr, ref_path = run_fwd(op, ref_backend, torch.float32, True)
        ref_cache["y"] = yr
        worst, worst_name = 0.0, None
        for pname, a, b in zip(names, gk[1:], gr[1:]):
            e = rel_err(a, b)
            if e is not None and e >= worst:
                worst, worst_name = e, pname
        res = {
            "path": path,
            "ref_path": ref_path,
            "out": _g(rel_err(yk, yr)),
            "grad_x": _g(rel_err(gk[0], gr[0])),
            "grad_params": _g(worst),
            "worst_param": worst_name,
        }
        res["pass"] = (
            res["out"] <= TOL["fp32_out"]
            and res["grad_x"] <= TOL["fp32_grad"]
            and res["grad_params"] <= TOL["fp32_grad"]
        )
        return res

    def check_fp32_fwd():
        yk, _, path = run_fwd(op, kernel_backend, torch.float32, False)
        yr = ref_fp32_fwd()
        e = rel_err(yk, yr)
        return {"path": path, "out": _g(e), "pass": e <= TOL["fp32_out"]}

    def check_bf16_fwd():
        mb = copy.deepcopy(op).to(torch.bfloat16)
        yk, _, path = run_fwd(mb, kernel_backend, torch.bfloat16, False)
        del mb
        e = rel_err(yk, ref_fp32_fwd())
        return {"path": path, "out": _g(e), "pass": e <= TOL["bf16_out"]}

    def check_reference():
        op.backend = ref_backend
        with torch.no_grad():
            yd = op.forward_reference(x)
        _sync(device)
        e = rel_err(ref_fp32_fwd(), yd)
        return {"path": f"{ref_backend} vs forward_reference", "out": _g(e), "pass": e <= TOL["reference"]}

    checks = [
        ("fp32_grad", grads, check_fp32_grad),
        ("fp32_fwd", True, check_fp32_fwd),
        ("bf16_fwd", bf16, check_bf16_fwd),
        ("reference", reference, check_reference),
    ]
    for key, wanted, fn in checks:
        if not wanted:
            continue
        t0 = time.time()
        out[key] = _guard(fn)
        out[key]["wall_s"] = round(time.time() - t0, 1)
        log(f"  {name}.{key}: {json.dumps({k: v for k, v in out[key].items() if k != 'traceback'})[:300]}")
    op.backend = kernel_backend
    done = [out[k] for k, wanted, _ in checks if wanted]
    out["pass"] = all(d.get("pass") is True for d in done)
    expected = out["expected_kernel"]
    if expected is not None:
        taken = {k: out[k].get("path") for k, wanted, _ in checks if wanted and k != "reference"}
        out["kernel_taken"] = {k: v == expected for k, v in taken.items()}
        missed = [k for k, v in out["kernel_taken"].items() if not v]
        if missed:
            out["note"] = (
                f"kernel {expected!r} not taken in {', '.join(missed)} (fell back to the torch path: "
                "see the warnings in the log; gated DeltaNet's backward is refused on Hopper with "
                "Triton < 3.7.1)"
            )
    return out


def step_parity(run: Run, mixers=MIXERS, device="cuda", **kwargs) -> dict:
    results = {}
    for name in mixers:
        if run.remaining() < 45:
            results[name] = {"skipped": f"time budget ({run.remaining():.0f}s left)"}
            run.log(f"parity {name}: skipped (time budget)")
            continue
        run.log(f"parity {name}: start")
        t0 = time.time()
        results[name] = _guard(mixer_parity, name, device, log=run.log, **kwargs)
        results[name]["wall_s"] = round(time.time() - t0, 1)
        run.log(f"parity {name}: pass={results[name].get('pass')} ({results[name]['wall_s']}s)")
        _empty_cache()
    return results


def hybrid_parity(
    device="cuda",
    dtype=torch.float32,
    *,
    dims: dict | None = None,
    operators: str = "A F S F M2 F D F GD F",
    vocab: int = 1000,
    batch: int = 2,
    prompt: int = 300,
    extra: int = 77,
    decode: int = 16,
    backend: str = "auto",
    seed: int = 0,
) -> dict:
    """Prefill `prompt` tokens (fresh sequence, meta tokens prepended), prefill `extra` more at start > 0,
    decode `decode` tokens one by one; every logit against the parallel forward of the same tokens."""
    from models.hybrid import HybridLM

    dims = dict(PARITY_DIMS if dims is None else dims)
    layout = parity_layout({**dims, "tied_embeddings": False}, operators)
    torch.manual_seed(seed)
    model = HybridLM(layout, vocab, backend=backend).to(device=device, dtype=dtype).eval()
    total = prompt + extra + decode
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, vocab, (batch, total), generator=gen).to(device)
    with torch.no_grad():
        full = model(tokens).float()
        paths_forward = model.backends()
        caches = model.init_cache(batch, total, device, dtype)
        lp1 = model.prefill(tokens[:, :prompt], caches, 0)
        start = model.next_position(0, prompt)
        lp2 = model.prefill(tokens[:, prompt : prompt + extra], caches, start)
        paths_prefill = model.backends()
        pos = torch.tensor(model.next_position(start, extra), dtype=torch.long, device=device)
        steps = []
        for i in range(decode):
            steps.append(model.decode_step(tokens[:, prompt + extra + i], caches, pos))
            pos.add_(1)
        dec = torch.stack(steps, 1)
    _sync(device)
    errs = {
        "prefill": rel_err(lp1, full[:, :prompt]),
        "prefill_continued": rel_err(lp2, full[:, prompt : prompt + extra]),
        "decode": rel_err(dec, full[:, prompt + extra :]),
    }
    tol = TOL["hybrid_fp32"] if dtype == torch.float32 else TOL["hybrid_bf16"]
    return {
        "layout": layout.compact(),
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "shape": f"B{batch} prompt {prompt} + {extra} (start>0) + {decode} decode steps, meta "
        f"{layout.meta_tokens}, swa_window {layout.swa_window}",
        "paths_forward": paths_forward,
        "paths_prefill": paths_prefill,
        "paths_decode": model.backends(),
        **{k: _g(v) for k, v in errs.items()},
        "tol": tol,
        "pass": all(v <= tol for v in errs.values()),
    }


def step_hybrid(run: Run, device="cuda", **kwargs) -> dict:
    out = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        t0 = time.time()
        out[label] = _guard(hybrid_parity, device, dtype, **kwargs)
        out[label]["wall_s"] = round(time.time() - t0, 1)
        run.log(
            f"hybrid {label}: {json.dumps({k: v for k, v in out[label].items() if k != 'traceback'})[:400]}"
        )
        _empty_cache()
    return out


# ------------------------------------------------------------------------------------------------------------
# 3. Decode latency against the anchor
# ------------------------------------------------------------------------------------------------------------


def anchor_candidates(explicit: str | None) -> list[Path]:
    paths = [Path(explicit)] if explicit else []
    paths += [
        ROOT / ".whl" / "gpu_anchor.py",
        ROOT.parent / "shared" / "bench" / "gpu_anchor.py",
        Path("/work/shared/bench/gpu_anchor.py"),
    ]
    return paths


def load_anchor(explicit: str | None = None):
    """Import gpu_anchor.py (the first of --anchor, .whl/, ../shared/bench/ that exists) as a module."""
    for path in anchor_candidates(explicit):
        if path.is_file():
            spec = importlib.util.spec_from_file_location("gpu_anchor", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.__file__ = str(path)
            return module
    raise FileNotFoundError("gpu_anchor.py not found in: " + ", ".join(map(str, anchor_candidates(explicit))))


def anchor_layout(kinds: str, dims: dict | None = None, vocab: int = ANCHOR_VOCAB):
    """Our layout for the anchor's TinyLM: each mixer ('a' attention, 'd' DeltaNet) followed by a SwiGLU
    FFN."""
    from search.layout import Layout

    ops = " ".join({"a": "A", "d": "D"}[k] + " F" for k in kinds)
    return Layout.from_dict(
        {"operators": ops, **(ANCHOR_DIMS if dims is None else dims), "vocab_size": vocab}
    )


def set_rope(model, on: bool) -> int:
    """Switch RoPE of every attention block (Attention reads `self.rope` at each call). Returns how many."""
    n = 0
    for block in model.blocks:
        if hasattr(block.op, "rope") and hasattr(block.op, "_inv_freq"):
            if on and not block.op._inv_freq:
                raise ValueError("this attention block was built without RoPE frequencies")
            block.op.rope = on
            n += 1
    return n


def ours_decode_latency(
    model,
    *,
    steps: int = ANCHOR_STEPS,
    start: int = ANCHOR_START,
    buffer_tokens: int = ANCHOR_BUFFER,
    device="cuda",
    eager: bool = True,
    graph: bool = True,
    warmup: int = 10,
) -> dict:
    """The anchor's method on our model: prefill `start` tokens into caches sized for `buffer_tokens`, then
    `steps` greedy decode steps timed eagerly, and `steps` replays of ONE CUDA graph of the whole step (token
    feedback and position increment inside the graph). Same batch (1), dtype (the model's), buffer and
    start."""
    if start + max(steps, warmup) > buffer_tokens:
        raise ValueError(f"buffer {buffer_tokens} too small for start {start} + {max(steps, warmup)} steps")
    model.eval()
    dtype = model.embed.weight.dtype
    out: dict = {
        "buffer_tokens": buffer_tokens + model.n_meta,
        "start": start,
        "steps": steps,
        "dtype": str(dtype).replace("torch.", ""),
    }
    with torch.no_grad():
        caches = model.init_cache(1, buffer_tokens, device, dtype)
        out["cache_bytes"] = sum(t.numel() * t.element_size() for c in caches for t in c.values())
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, model.vocab_size, (1, start), generator=gen).to(device)
        logits = model.prefill(prompt, caches)
        p0 = model.next_position(0, start)
        tok = logits[:, -1].argmax(-1).contiguous()
        pos = torch.tensor(p0, dtype=torch.long, device=device)

        def step():
            nxt = model.decode_step(tok, caches, pos)
            tok.copy_(nxt.argmax(-1))
            pos.add_(1)

        for _ in range(warmup):
            step()
        _sync(device)
        if eager:
            pos.fill_(p0)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            out["eager_ms_per_token"] = round((time.perf_counter() - t0) / steps * 1e3, 4)
        if graph:
            if torch.device(device).type != "cuda":
                raise ValueError("graph timing needs CUDA")
            pos.fill_(p0)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            pos.fill_(p0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                g.replay()
            torch.cuda.synchronize()
            out["cudagraph_ms_per_token"] = round((time.perf_counter() - t0) / steps * 1e3, 4)
            del g
    caches = None  # free the GPU memory (the closure above holds it)
    return out


def profile_latency(
    model,
    method: str,
    *,
    device="cuda",
    prompt_len: int = ANCHOR_START,
    decode_tokens: int = ANCHOR_STEPS,
    dtype: str = "bf16",
) -> dict:
    """`latency.profiler.profile` at the anchor's prompt/decode lengths (its buffer: prompt + decode
    tokens)."""
    from latency.profiler import LatencyConfig, profile

    repeats, warmup = (5, 1) if method == "cuda-graph" else (2, 0)  # eager runs after the graph run (warm)
    config = LatencyConfig(
        prompt_len=prompt_len,
        decode_tokens=decode_tokens,
        dtype=dtype,
        method=method,
        throughput=False,
        repeats=repeats,
        warmup=warmup,
        vocab_size=model.vocab_size,
    )
    res = profile(model, config, device)
    return {
        "method": method,
        "ms_per_token": round(res.decode_ms_per_token.median, 4),
        "iqr_ms": round(res.decode_ms_per_token.iqr, 4),
        "repeats": repeats,
        "prefill_ms": round(res.prefill_ms.median, 3),
        "buffer_tokens": res.cache_buffer_tokens,
        "cache_bytes": res.cache_bytes_per_sequence,
    }


def decode_compare(
    run: Run,
    anchor,
    tag: str,
    kinds: str,
    *,
    device="cuda",
    dims: dict | None = None,
    vocab: int = ANCHOR_VOCAB,
    steps: int = ANCHOR_STEPS,
    start: int = ANCHOR_START,
    buffer_tokens: int = ANCHOR_BUFFER,
    graph: bool = True,
) -> dict:
    """The anchor's decode_latency(tag, kinds) beside our HybridLM of the same shapes (defaults: the
    anchor's). On CPU (tests): anchor=None, tiny dims, graph=False — exercises the code paths, eager only."""
    from models.hybrid import HybridLM

    out: dict = {"layers": kinds, "anchor_buffer_tokens": ANCHOR_BUFFER}
    # The anchor's own measurement (its TinyLM: fused QKV / gate-up, F.rms_norm, no RoPE; fla's fused
    # recurrent DeltaNet step without short convs), same process, same card.
    t0 = time.time()
    if anchor is None:
        out["anchor"] = {"error": "gpu_anchor.py could not be loaded (see anchor_error)"}
    else:
        n_before = len(anchor.RESULTS)
        res = _guard(
            lambda: {
                "nbytes": anchor.decode_latency(tag, list(kinds), steps=ANCHOR_STEPS, start=ANCHOR_START)
            }
        )
        rows = [r for r in anchor.RESULTS[n_before:] if r.get("name") == f"decode.{tag}"]
        out["anchor"] = {**rows[-1], "wall_s": round(time.time() - t0, 1)} if rows else res
    run.log(f"decode {tag}: anchor {json.dumps(out['anchor'])[:300]}")
    _empty_cache()

    layout = anchor_layout(kinds, dims, vocab)
    torch.manual_seed(0)
    model = HybridLM(layout, vocab, backend="auto").to(device, torch.bfloat16).eval()
    out["ours_params_M"] = round(model.num_parameters() / 1e6, 1)
    out["ours_layout"] = layout.compact()
    timing = dict(steps=steps, start=start, buffer_tokens=buffer_tokens, device=device, graph=graph)
    lengths = dict(device=device, prompt_len=start, decode_tokens=steps)
    parts = [
        ("ours_buffer4096", lambda: ours_decode_latency(model, **timing)),
        ("ours_buffer4096_norope", lambda: _norope(model, **timing)),
        ("profile_graph", lambda: profile_latency(model, "cuda-graph", **lengths)),
        ("profile_eager", lambda: profile_latency(model, "eager", **lengths)),
    ]
    if not graph:
        parts = [p for p in parts if p[0] != "profile_graph"]
    for key, fn in parts:
        if run.remaining() < 20:
            out[key] = {"skipped": "time budget"}
            continue
        t0 = time.time()
        out[key] = _guard(fn)
        out[key]["wall_s"] = round(time.time() - t0, 1)
        run.log(
            f"decode {tag}: {key} {json.dumps({k: v for k, v in out[key].items() if k != 'traceback'})[:300]}"
        )
        _empty_cache()
    out["ours_backends"] = model.backends()
    model = None  # free the GPU memory (the closures above hold it)
    _empty_cache()

    a = out["anchor"].get("cudagraph_ms_per_token")
    mine = out["ours_buffer4096"].get("cudagraph_ms_per_token")
    ratios = {}
    if a:
        for key, field in (
            ("ours_buffer4096", "cudagraph_ms_per_token"),
            ("ours_buffer4096_norope", "cudagraph_ms_per_token"),
            ("profile_graph", "ms_per_token"),
        ):
            v = out[key].get(field)
            if v:
                ratios[key] = round(v / a, 3)
        ae = out["anchor"].get("eager_ms_per_token")
        if ae and out["ours_buffer4096"].get("eager_ms_per_token"):
            ratios["ours_buffer4096_eager"] = round(out["ours_buffer4096"]["eager_ms_per_token"] / ae, 3)
    out["ratio_vs_anchor_graph"] = ratios
    if a and mine:
        out["target_met"] = mine / a <= 1.2
    run.log(
        f"decode {tag}: anchor graph {a} ms/token, ours (same buffer) {mine} ms/token, ratios ours/anchor "
        f"{json.dumps(ratios)}, target <= 1.2 met: {out.get('target_met')}"
    )
    return out


def _norope(model, **timing) -> dict:
    n = set_rope(model, False)
    try:
        res = ours_decode_latency(model, **{**timing, "eager": not timing.get("graph", True)})
    finally:
        set_rope(model, True)
    return {**res, "rope_blocks_switched_off": n}


def step_decode(
    run: Run, anchor_path: str | None, models: dict | None = None, use_anchor: bool = True, **kwargs
) -> dict:
    out: dict = {
        "note": (
            f"Anchor: gpu_anchor.decode_latency (TinyLM, KV buffer {ANCHOR_BUFFER}, decode from "
            f"position {ANCHOR_START}, {ANCHOR_STEPS} steps, batch 1, bf16). ours_buffer4096: our "
            f"HybridLM with the anchor's method and buffer (prefill {ANCHOR_START} tokens, then the "
            "same timing loop), with RoPE (as built) and without (like the anchor). profile_*: "
            f"latency.profiler.profile, whose caches hold prompt_len + decode_tokens = "
            f"{ANCHOR_START + ANCHOR_STEPS} tokens (smaller than the anchor's {ANCHOR_BUFFER}: "
            "full attention's masked SDPA reads the whole buffer, so it is not like for like)."
        )
    }
    anchor = None
    try:
        if use_anchor:
            anchor = load_anchor(anchor_path)
            out["anchor_file"] = anchor.__file__
        else:
            out["anchor_error"] = "anchor not used (use_anchor=False)"
    except Exception as exc:
        out["anchor_error"] = f"{type(exc).__name__}: {exc}"
    for tag, kinds in (ANCHOR_MODELS if models is None else models).items():
        if run.remaining() < 40:
            out[tag] = {"skipped": "time budget"}
            continue
        out[tag] = _guard(decode_compare, run, anchor, tag, kinds, **kwargs)
    return out


# ------------------------------------------------------------------------------------------------------------
# 4. LUT (optional: latency/lut.py is written separately)
# ------------------------------------------------------------------------------------------------------------

# A small GPU table: one width and one context (the anchor's), every operator, 4 copies per model, 2 rounds.
LUT_BASE_DIMS = {
    "head_dim": 64,
    "kv_group": 4,
    "mamba_head_dim": 64,
    "mamba_d_state": 128,
    "swa_window": 512,
    "ffn_ratio": 2.75,
}
LUT_TEST_PATTERNS = {
    "[A F] x 6": "[A F] x 6",
    "[D F D F A F] x 2": "[D F D F A F] x 2",
    "[M2 F S F] x 3": "[M2 F S F] x 3",
    "[GD F M2 F A F] x 2": "[GD F M2 F A F] x 2",
}


def step_lut(
    run: Run,
    *,
    device="cuda",
    widths=(1024,),
    contexts=(1024,),
    operators=(*MIXERS, "ffn"),
    base_dims: dict | None = None,
    copies: int = 4,
    rounds: int = 2,
    decode_tokens: int = 64,
    repeats: int = 3,
    vocab: int = ANCHOR_VOCAB,
    dtype: str = "bf16",
    method: str = "cuda-graph",
    patterns: dict | None = None,
) -> dict:
    """Build a small LUT with `latency.lut.build_lut`, then `latency.lut.confirm` (prediction vs a direct
    measurement of the whole model, same config and device) on a few layouts at the table's width/context."""
    if importlib.util.find_spec("latency.lut") is None:
        return {"skipped": "latency/lut.py not present"}

    from latency import lut
    from latency.profiler import LatencyConfig
    from search.layout import Layout

    base_dims = dict(LUT_BASE_DIMS if base_dims is None else base_dims)
    config = LatencyConfig(
        prompt_len=min(contexts),
        decode_tokens=decode_tokens,
        repeats=repeats,
        warmup=1,
        dtype=dtype,
        method=method,
        throughput=False,
        vocab_size=vocab,
    )
    out: dict = {
        "widths": list(widths),
        "contexts": list(contexts),
        "operators": list(operators),
        "copies": copies,
        "rounds": rounds,
        "base_dims": base_dims,
        "config": config.to_dict(),
    }
    t0 = time.time()
    data = lut.build_lut(
        widths,
        contexts,
        operators,
        base_dims=base_dims,
        config=config,
        device=device,
        copies=copies,
        rounds=rounds,
        progress=lambda msg: run.log(f"lut: {msg}"),
    )
    out["build_s"] = round(time.time() - t0, 1)
    path = lut.save_lut(data, run.out_dir / "gpu_check_lut.json")
    out["table_file"] = path.name
    out["entries"] = [
        {k: e.get(k) for k in ("operator", "d_model", "context", "decode_ms", "spread_ms")}
        for e in data["entries"]
    ]
    out["overhead"] = [{k: e.get(k) for k in ("d_model", "context", "decode_ms")} for e in data["overhead"]]
    dims_fn = lut.dims_for_widths(base_dims, widths)
    rows = []
    for label, ops in (LUT_TEST_PATTERNS if patterns is None else patterns).items():
        for width in widths:
            for context in contexts:
                if run.remaining() < 15:
                    rows.append({"layout": label, "skipped": "time budget"})
                    continue

                def one(ops=ops, width=width, context=context):
                    layout = Layout.from_dict({"operators": ops, **dims_fn(width), "d_model": width})
                    cfg = config.replace(prompt_len=context)
                    predicted, measured, rel = lut.confirm(layout, data, cfg, device)
                    return {
                        "predicted_ms": round(predicted, 4),
                        "measured_ms": round(measured, 4),
                        "rel_error": round(rel, 3),
                    }

                rows.append({"layout": label, "d_model": width, "context": context, **_guard(one)})
                run.log(
                    f"lut: confirm {json.dumps({k: v for k, v in rows[-1].items() if k != 'traceback'})}"[
                        :300
                    ]
                )
    out["confirm"] = rows
    errs = [abs(r["rel_error"]) for r in rows if "rel_error" in r]
    out["max_abs_rel_error"] = max(errs) if errs else None
    return out


def _md_lut(r: dict) -> list[str]:
    if "skipped" in r:
        return [r["skipped"]]
    out = [
        f"Table: widths {r.get('widths')}, contexts {r.get('contexts')}, {r.get('copies')} copies x "
        f"{r.get('rounds')} rounds, built in {r.get('build_s')} s (`{r.get('table_file')}`).",
        "",
        "| operator | d_model | context | decode ms/block | spread ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for e in r.get("overhead", []):
        out.append(f"| (overhead) | {e['d_model']} | {e['context']} | {_fmt(e.get('decode_ms'))} | |")
    for e in r.get("entries", []):
        out.append(
            f"| {e['operator']} | {e['d_model']} | {e['context']} | {_fmt(e.get('decode_ms'))} | "
            f"{_fmt(e.get('spread_ms'))} |"
        )
    out += [
        "",
        "Predictor (`latency.lut.confirm`): table prediction against a direct measurement.",
        "",
        "| layout | d_model | context | predicted ms | measured ms | rel. error |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in r.get("confirm", []):
        if "rel_error" not in row:
            out.append(f"| {row.get('layout')} | | | {row.get('skipped') or _err_line(row)} | | |")
            continue
        out.append(
            f"| {row['layout']} | {row['d_model']} | {row['context']} | {_fmt(row['predicted_ms'])} | "
            f"{_fmt(row['measured_ms'])} | {row['rel_error']:+.3f} |"
        )
    return out


# ------------------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "PASS" if v else "FAIL"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _err_line(d: dict) -> str:
    return f"error: `{d.get('error', '')[:300]}`" if isinstance(d, dict) and "error" in d else ""


def render_markdown(data: dict) -> str:
    meta, steps = data["meta"], data["steps"]
    lines = ["# GPU check (benchmarks/gpu_check.py)", ""]
    if data.get("status"):
        lines += [f"**{data['status']}**", ""]
    lines += [f"- date: {meta.get('date')}", f"- command: `{meta.get('command')}`"]
    if "elapsed_s" in meta:
        lines.append(f"- elapsed: {meta['elapsed_s']} s (budget {meta.get('budget_s')} s)")
    for key in ("torch", "reason"):
        if key in meta:
            lines.append(f"- {key}: {meta[key]}")
    lines.append("")
    if not steps:
        if data.get("status"):
            lines += [
                "What it checks on a CUDA machine: kernel-vs-torch parity of every mixer (float32 forward "
                "and gradients, bf16 forward), HybridLM prefill + decode against the parallel forward, "
                "CUDA-graph decode latency against the reference `gpu_anchor.py` at its llama12_d1024 / "
                "hybrid shapes (target: ours / anchor <= 1.2), and the latency LUT if present.",
                "",
            ]
        return "\n".join(lines) + "\n"
    tol = data.get("tolerances", TOL)
    lines.append("Tolerances (max|a-b| / max|b|): " + ", ".join(f"{k} {v:g}" for k, v in tol.items()))
    lines.append("")
    for name, entry in steps.items():
        lines.append(f"## {name} — {entry.get('status')} ({entry.get('wall_s', '—')} s)")
        lines.append("")
        if entry.get("status") == "skipped":
            lines += [entry.get("reason", ""), ""]
            continue
        if entry.get("status") == "error":
            lines += [f"`{entry.get('error')}`", "", "```", entry.get("traceback", "")[-1500:], "```", ""]
            continue
        result = entry.get("result") or {}
        renderer = {
            "env": _md_env,
            "parity": _md_parity,
            "hybrid": _md_hybrid,
            "decode": _md_decode,
            "lut": _md_lut,
        }.get(name)
        lines += (
            renderer(result) if renderer else ["```", json.dumps(result, indent=1, default=str)[:6000], "```"]
        )
        lines.append("")
    return "\n".join(lines) + "\n"


def _md_env(r: dict) -> list[str]:
    out = ["| item | value |", "| --- | --- |"]
    for k, v in r.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        out.append(f"| {k} | {v} |")
    return out


def _md_parity(r: dict) -> list[str]:
    out = [
        "| mixer | fp32 path (auto / ref) | fp32 out | fp32 grad x | fp32 grad params (worst) | "
        "no-grad fp32 path: out | bf16 path: out | torch vs forward_reference | pass |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for name, d in r.items():
        if "skipped" in d or "error" in d:
            out.append(f"| {name} | {d.get('skipped') or _err_line(d)} | | | | | | | FAIL |")
            continue
        g, f, b, ref = (d.get(k, {}) for k in ("fp32_grad", "fp32_fwd", "bf16_fwd", "reference"))
        out.append(
            f"| {name} | {_err_line(g) or (str(g.get('path')) + ' / ' + str(g.get('ref_path')))} | "
            f"{_fmt(g.get('out'))} | {_fmt(g.get('grad_x'))} | {_fmt(g.get('grad_params'))} "
            f"({g.get('worst_param', '')}) | "
            f"{_err_line(f) or (str(f.get('path')) + ': ' + _fmt(f.get('out')))} | "
            f"{_err_line(b) or (str(b.get('path')) + ': ' + _fmt(b.get('out')))} | "
            f"{_err_line(ref) or _fmt(ref.get('out'))} | {_fmt(d.get('pass'))} |"
        )
        if d.get("note"):
            notes.append(f"- {name}: {d['note']}")
    shape = next((d.get("shape") for d in r.values() if d.get("shape")), "")
    return [f"Shape {shape}; same weights for every path.", ""] + out + ([""] + notes if notes else [])


def _md_hybrid(r: dict) -> list[str]:
    out = [
        "| dtype | prefill | prefill at start>0 | decode steps | tol | pass | paths (prefill) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    shape = ""
    for label, d in r.items():
        if "error" in d:
            out.append(f"| {label} | {_err_line(d)} | | | | FAIL | |")
            continue
        shape = d.get("shape", shape)
        paths = ", ".join(f"{k}={v}" for k, v in (d.get("paths_prefill") or {}).items())
        out.append(
            f"| {label} | {_fmt(d.get('prefill'))} | {_fmt(d.get('prefill_continued'))} | "
            f"{_fmt(d.get('decode'))} | {d.get('tol')} | {_fmt(d.get('pass'))} | {paths} |"
        )
    return [
        f"Layout `{next((d.get('layout') for d in r.values() if d.get('layout')), '')}`, {shape}; "
        "logits against the parallel forward.",
        "",
    ] + out


def _md_decode(r: dict) -> list[str]:
    out = [r.get("note", ""), ""]
    if r.get("anchor_error"):
        out += [f"anchor: `{r['anchor_error']}`", ""]
    out += [
        "| model | what | buffer tokens | eager ms/token | CUDA-graph ms/token | graph ratio vs anchor |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for tag, d in r.items():
        if not isinstance(d, dict):
            continue
        if "error" in d or "skipped" in d:
            out.append(f"| {tag} | {d.get('skipped') or _err_line(d)} | | | | |")
            continue
        ratios = d.get("ratio_vs_anchor_graph", {})
        a = d.get("anchor", {})
        out.append(
            f"| {tag} | anchor TinyLM | {ANCHOR_BUFFER} | {_fmt(a.get('eager_ms_per_token'))} | "
            f"{_fmt(a.get('cudagraph_ms_per_token'))} | 1 {_err_line(a)} |"
        )
        for key, label in (
            ("ours_buffer4096", "ours, anchor's loop (RoPE on)"),
            ("ours_buffer4096_norope", "ours, anchor's loop, RoPE off"),
            ("profile_graph", "latency.profiler, cuda-graph"),
            ("profile_eager", "latency.profiler, eager"),
        ):
            p = d.get(key, {})
            if "error" in p or "skipped" in p:
                out.append(f"| {tag} | {label} | | {p.get('skipped') or _err_line(p)} | | |")
                continue
            eager = (
                p.get("eager_ms_per_token")
                if "eager_ms_per_token" in p
                else (p.get("ms_per_token") if p.get("method") == "eager" else None)
            )
            graph = (
                p.get("cudagraph_ms_per_token")
                if "cudagraph_ms_per_token" in p
                else (p.get("ms_per_token") if p.get("method") == "cuda-graph" else None)
            )
            out.append(
                f"| {tag} | {label} | {p.get('buffer_tokens', '—')} | {_fmt(eager)} | {_fmt(graph)} | "
                f"{_fmt(ratios.get(key))} |"
            )
        if "target_met" in d:
            out.append(
                f"| {tag} | **target ours/anchor <= 1.2 (same buffer, RoPE on)** | | | | "
                f"{_fmt(d['target_met'])} |"
            )
    return out


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------


def command_line(argv: list[str]) -> str:
    script = Path(__file__).resolve()
    try:
        shown = str(script.relative_to(Path.cwd()))
    except ValueError:
        shown = str(script)
    return "PYTHONPATH=. python3 " + shlex.join([shown, *argv])


def write_not_run(out_dir: Path, command: str, reason: str = "not run: no GPU") -> None:
    data = {
        "status": reason,
        "meta": {
            "date": _now(),
            "command": command,
            "torch": torch.__version__,
            "reason": "torch.cuda.is_available() is False on this machine",
        },
        "steps": {},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(data, indent=1) + "\n")
    (out_dir / "gpu_check.md").write_text(render_markdown(data))


def default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results)")
    parser.add_argument(
        "--anchor", default=None, help="path to gpu_anchor.py (default: .whl/ or ../shared/bench/)"
    )
    parser.add_argument(
        "--steps",
        default=",".join(DEFAULT_STEPS),
        help=f"comma-separated, run in this order (default {','.join(DEFAULT_STEPS)})",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="steps (and sub-steps) are skipped once this many seconds have passed",
    )
    args = parser.parse_args(argv)
    out_dir = Path(args.out) if args.out else default_out()
    command = command_line(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in DEFAULT_STEPS]
    if unknown:
        parser.error(f"unknown steps {unknown} (known: {', '.join(DEFAULT_STEPS)})")
    if not torch.cuda.is_available():
        write_not_run(out_dir, command)
        print(f"not run: no GPU (wrote {out_dir / 'gpu_check.md'})", flush=True)
        return 0
    logging_setup()
    run = Run(out_dir, command, args.budget_s)
    run.log(
        f"gpu_check: out={out_dir} steps={steps} budget={args.budget_s}s "
        f"device={torch.cuda.get_device_name()}"
    )
    run.write()
    # rough minimum time for a step to be worth starting
    plan = {
        "env": (step_env, (), 0),
        "decode": (step_decode, (args.anchor,), 40),
        "parity": (step_parity, (), 45),
        "hybrid": (step_hybrid, (), 30),
        "lut": (step_lut, (), 90),
    }
    for name in steps:
        fn, fargs, min_s = plan[name]
        run.step(name, fn, *fargs, min_s=min_s)
    run.log(f"gpu_check: finished; wrote {out_dir / 'gpu_check.md'} and gpu_check.json")
    print("\n" + render_markdown(run.to_dict()), flush=True)
    return 0


def logging_setup() -> None:
    """Show the kernels' fallback warnings (models.kernels, models.attention) on stderr, with timestamps; let
    torch.compile (FlexAttention) recompile for the ~10 shapes this one process uses instead of falling back
    to uncompiled flex_attention after its default limit of 8."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
    except Exception as exc:  # an old or new torch without these knobs: the run goes on
        print(f"note: could not raise torch._dynamo's recompile limit ({exc})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
