"""benchmarks/gpu_check.py on CPU: its parity / decode code paths run at tiny shapes ("torch" against "torch",
the kernels' CPU fallback), its report renders, and without CUDA the script writes "not run: no GPU"."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

TINY = dict(
    d_model=32,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    swa_window=5,
    meta_tokens=2,
    mamba_head_dim=16,
    mamba_d_state=8,
    mamba_expand=2,
    conv_size=4,
    ffn_ratio=2.0,
)
TINY_ANCHOR = dict(
    d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, ffn_ratio=2.75, tied_embeddings=False, meta_tokens=0
)


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("name", ["attention", "swa", "mamba2", "deltanet", "gated_deltanet"])
def test_mixer_parity_runs_on_cpu(gc, name):
    r = gc.mixer_parity(
        name,
        "cpu",
        dims=TINY,
        batch=2,
        seqlen=19,
        kernel_backend="torch",
        ref_backend="torch",
        log=lambda msg: None,
    )
    for key in ("fp32_grad", "fp32_fwd", "bf16_fwd", "reference"):
        assert "error" not in r[key], r[key].get("traceback")
    # torch against torch on the same weights: identical; the torch path matches the module's reference
    assert r["fp32_grad"]["out"] == 0 and r["fp32_grad"]["grad_x"] == 0 and r["fp32_grad"]["grad_params"] == 0
    assert r["fp32_grad"]["pass"] and r["fp32_fwd"]["pass"] and r["reference"]["pass"]
    assert 0 < r["bf16_fwd"]["out"] < 0.1  # bf16 weights and activations against float32
    assert r["fp32_grad"]["path"] in ("torch", "sdpa", "blocked")


def test_auto_backend_falls_back_on_cpu(gc):
    r = gc.mixer_parity(
        "deltanet",
        "cpu",
        dims=TINY,
        batch=1,
        seqlen=9,
        kernel_backend="auto",
        bf16=False,
        log=lambda msg: None,
    )
    assert r["pass"] and r["fp32_grad"]["path"] == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hybrid_parity_runs_on_cpu(gc, dtype):
    r = gc.hybrid_parity("cpu", dtype, dims=TINY, vocab=50, prompt=12, extra=5, decode=4)
    assert r["pass"], r
    assert set(r["paths_prefill"]) >= {"attention", "swa", "mamba2", "deltanet", "gated_deltanet"}


def test_report_renders_every_step(gc, tmp_path):
    run = gc.Run(tmp_path, "test", budget_s=600)
    run.step("env", gc.step_env)
    run.step("parity", gc.step_parity, ("swa", "mamba2"), device="cpu", dims=TINY, batch=1, seqlen=11)
    run.step("hybrid", gc.step_hybrid, device="cpu", dims=TINY, vocab=40, prompt=8, extra=3, decode=2)
    run.step(
        "decode",
        gc.step_decode,
        None,
        models={"tiny_ad": "ad"},
        use_anchor=False,
        device="cpu",
        dims=TINY_ANCHOR,
        vocab=64,
        steps=3,
        start=5,
        buffer_tokens=16,
        graph=False,
    )
    run.step("lut", lambda r: (_ for _ in ()).throw(RuntimeError("boom")))
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = data["steps"]
    assert [steps[s]["status"] for s in ("env", "parity", "hybrid", "decode", "lut")] == ["ok"] * 4 + [
        "error"
    ]
    assert all(v["pass"] for v in steps["parity"]["result"].values())
    assert steps["hybrid"]["result"]["fp32"]["pass"]
    tiny = steps["decode"]["result"]["tiny_ad"]
    assert tiny["ours_buffer4096"]["eager_ms_per_token"] > 0
    assert tiny["ours_buffer4096_norope"]["rope_blocks_switched_off"] == 1
    assert tiny["profile_eager"]["ms_per_token"] > 0 and tiny["profile_eager"]["buffer_tokens"] == 8
    assert "error" in tiny["anchor"]
    md = (tmp_path / "gpu_check.md").read_text()
    for text in (
        "## parity",
        "| swa |",
        "## hybrid",
        "## decode",
        "latency.profiler, eager",
        "RuntimeError: boom",
    ):
        assert text in md


def test_anchor_loads_when_present(gc):
    if not any(p.is_file() for p in gc.anchor_candidates(None)):
        pytest.skip("gpu_anchor.py not available here")
    anchor = gc.load_anchor(None)
    assert callable(anchor.decode_latency) and isinstance(anchor.RESULTS, list)


def test_anchor_layouts_match_the_anchor_size(gc):
    from models.hybrid import HybridLM

    for kinds in gc.ANCHOR_MODELS.values():
        layout = gc.anchor_layout(kinds)
        assert layout.ffn_hidden == 2816 and layout.head_dim == 64 and not layout.tied_embeddings
        with torch.device("meta"):
            params = HybridLM(layout, gc.ANCHOR_VOCAB).num_parameters()
        assert abs(params / 1e6 - 219.8) < 0.5  # the anchor's TinyLM: 219.7M / 219.8M


def test_without_cuda_writes_not_run(tmp_path):
    for name in ("gpu_check.md", "gpu_check.json"):
        (tmp_path / name).write_text("POISON\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "gpu_check.md").read_text()
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "POISON" not in md and "not run: no GPU" in md and "gpu_check.py" in md
    assert data["status"] == "not run: no GPU" and data["meta"]["date"]


def test_lut_step_runs_on_cpu(gc, tmp_path):
    if importlib.util.find_spec("latency.lut") is None:
        pytest.skip("latency/lut.py not present")
    run = gc.Run(tmp_path, "test", budget_s=600)
    run.step(
        "lut",
        gc.step_lut,
        device="cpu",
        widths=(32,),
        contexts=(8,),
        operators=("deltanet", "ffn"),
        base_dims={"head_dim": 8, "kv_group": 2, "mamba_head_dim": 16, "mamba_d_state": 8, "swa_window": 4},
        copies=1,
        rounds=1,
        decode_tokens=4,
        repeats=1,
        vocab=64,
        dtype="fp32",
        method="eager",
        patterns={"D F": "D F"},
    )
    entry = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["lut"]
    assert entry["status"] == "ok", entry.get("traceback")
    row = entry["result"]["confirm"][0]
    assert "rel_error" in row, row.get("traceback")
    assert (tmp_path / "gpu_check_lut.json").is_file()
    assert "Predictor" in (tmp_path / "gpu_check.md").read_text()
