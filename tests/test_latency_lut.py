"""Latency look-up table: the predictor's arithmetic on a synthetic table, the width rule, a tiny real build
on this CPU, the JSON round trip, the CLI, and search/latency_model staying torch-free."""

import json
import subprocess
import sys
import time

import pytest

from search.latency_model import LatencyTable, largest_width_meeting
from search.layout import Layout
from search.params import count_parameters
from search.space import SearchSpace

DIMS = {"head_dim": 16, "kv_group": 2, "mamba_head_dim": 16, "mamba_d_state": 16, "swa_window": 64}


def synthetic_table(with_dims: bool = False) -> LatencyTable:
    # attention grows with context and width; mamba2/ffn depend on width only; overhead on width only.
    entries = []
    for width in (64, 128):
        for context in (100, 300):
            entries.append(
                {
                    "operator": "attention",
                    "d_model": width,
                    "context": context,
                    "decode_ms": width / 64 + context / 100,
                }
            )
            entries.append(
                {"operator": "mamba2", "d_model": width, "context": context, "decode_ms": width / 32}
            )
            entries.append(
                {
                    "operator": "ffn",
                    "d_model": width,
                    "context": context,
                    "decode_ms": 0.5 * width / 64,
                    "prefill_ms": 10.0,
                }
            )
    overhead = [
        {"d_model": w, "context": c, "decode_ms": 0.25 * w / 64, "prefill_ms": 1.0}
        for w in (64, 128)
        for c in (100, 300)
    ]
    dims = []
    if with_dims:
        space = SearchSpace(mixers=("attention", "mamba2"), widths=(64, 128), dims=DIMS)
        for w in (64, 128):
            full = Layout.from_dict(
                {"operators": ["attention", "mamba2", "ffn"], **space._dims_for(w)}
            ).to_dict()
            dims.append({k: v for k, v in full.items() if k not in ("operators", "name", "vocab_size")})
    return LatencyTable(entries, overhead, dims=dims, config={"vocab_size": 257})


def layout(ops, width=64, **dims):
    space = SearchSpace(mixers=("attention", "mamba2"), widths=(64, 96, 128, 256), dims=DIMS)
    return Layout.from_dict({"operators": ops, **space._dims_for(width), **dims})


def test_prediction_is_overhead_plus_exact_sum():
    table = synthetic_table()
    lo = layout(["attention", "ffn", "mamba2", "ffn", "mamba2"], 64)
    # overhead 0.25 + attention (1 + 1) + 2 x ffn 0.5 + 2 x mamba2 2
    assert table.predict_decode_ms(lo, 100) == pytest.approx(0.25 + 2.0 + 1.0 + 4.0)
    assert table.predict_decode_ms(lo, 300) == pytest.approx(0.25 + 4.0 + 1.0 + 4.0)
    lo128 = layout(["attention", "ffn"], 128)
    assert table.predict_decode_ms(lo128, 100) == pytest.approx(0.5 + 3.0 + 1.0)
    parts = table.breakdown(lo, 100)
    assert parts["operators"]["mamba2"] == {"count": 2, "each_ms": 2.0, "total_ms": 4.0}


def test_linear_interpolation_in_context_and_width():
    table = synthetic_table()
    assert table.op_cost("attention", 64, 200) == pytest.approx(1 + 2)
    assert table.op_cost("attention", 96, 100) == pytest.approx(1.5 + 1)
    assert table.op_cost("attention", 96, 200) == pytest.approx(1.5 + 2)  # bilinear
    assert table.overhead_cost(96, 150) == pytest.approx(0.375)
    lo = layout(["attention", "mamba2"], 96)
    assert table.predict_decode_ms(lo, 250) == pytest.approx(0.375 + (1.5 + 2.5) + 3.0)


def test_refuses_what_it_cannot_interpolate():
    table = synthetic_table()
    with pytest.raises(ValueError, match=r"operator 'attention'.*d_model=256.*does not extrapolate"):
        table.predict_decode_ms(layout(["attention", "ffn"], 256), 100)
    with pytest.raises(ValueError, match="d_model=32"):
        table.op_cost("mamba2", 32, 100)
    # full attention grows with context: no extrapolation beyond the measured contexts ...
    with pytest.raises(ValueError, match=r"operator 'attention'.*context 1000"):
        table.predict_decode_ms(layout(["attention"], 64), 1000)
    # ... while state/FFN costs and the overhead do not depend on it (nearest measured value is held).
    assert table.predict_decode_ms(layout(["mamba2", "ffn"], 64), 1000) == pytest.approx(0.25 + 2 + 0.5)
    # an operator the table never measured
    with pytest.raises(ValueError, match="operator 'deltanet'"):
        table.predict_decode_ms(layout(["deltanet"], 64), 100)


def test_dims_mismatch_is_refused():
    table = synthetic_table(with_dims=True)
    assert table.predict_decode_ms(layout(["attention", "ffn"], 64), 100) == pytest.approx(0.25 + 2 + 0.5)
    with pytest.raises(ValueError, match="head_dim"):
        table.predict_decode_ms(layout(["attention"], 64, head_dim=32, n_heads=2, n_kv_heads=1), 100)
    with pytest.raises(ValueError, match="mamba_d_state"):
        table.predict_decode_ms(layout(["mamba2"], 64, mamba_d_state=64), 100)


def test_size_factor_scales_the_block_sum():
    base = synthetic_table()
    lo = layout(["attention", "ffn", "mamba2", "ffn"], 64)
    nbytes = base.weight_bytes(lo)
    assert nbytes == 4 * (sum(count_parameters(lo, 257).per_operator) + 64 + 257 * 64)
    curve = [
        {"d_model": w, "context": 100, "weight_bytes": b, "factor": f}
        for w in (64, 128)
        for b, f in ((nbytes // 2, 1.0), (nbytes * 3 // 2, 2.0))
    ]
    data = base.to_dict()
    data["size_curve"] = curve
    table = LatencyTable.from_dict(data)
    blocks = 2.0 + 2 * 0.5 + 2.0
    parts = table.breakdown(lo, 100)
    assert parts["size_factor"] == pytest.approx(1.5, rel=1e-3)  # halfway between the two sizes
    assert parts["total_ms"] == pytest.approx(0.25 + parts["size_factor"] * blocks)
    per_op = sum(o["total_ms"] for o in parts["operators"].values())
    assert parts["total_ms"] == pytest.approx(parts["overhead_ms"] + per_op)
    small = layout(["mamba2"], 64)  # fewer bytes than the curve: the smallest measured factor holds
    assert table.size_factor(small, 100) == 1.0
    big = layout(["attention", "ffn"] * 10, 64)  # more bytes: the largest measured factor holds
    assert table.size_factor(big, 100) == 2.0
    assert table.size_factor(lo, 300) == table.size_factor(lo, 100)  # context: nearest measured
    assert base.size_factor(lo, 100) == 1.0  # no curve: a plain sum
    with pytest.raises(ValueError, match="factor"):
        LatencyTable.from_dict(
            {**data, "size_curve": [{"d_model": 64, "context": 1, "weight_bytes": 1, "factor": 0}]}
        )


def test_width_rule_picks_largest_feasible_width():
    table = synthetic_table()
    space = SearchSpace(mixers=("attention", "mamba2"), widths=(64, 96, 128), dims=DIMS)
    pattern = layout(["attention", "ffn", "mamba2", "ffn"], 64)
    costs = {w: table.predict_decode_ms(pattern.replace(**space._dims_for(w)), 100) for w in (64, 96, 128)}
    assert costs[64] < costs[96] < costs[128]
    assert table.largest_width_meeting(pattern, costs[128], (64, 96, 128), 100, space) == 128
    assert table.largest_width_meeting(pattern, costs[128] - 1e-9, (64, 96, 128), 100, space) == 96
    assert table.largest_width_meeting(pattern, costs[96], [128, 64, 96], 100, space._dims_for) == 96
    assert largest_width_meeting(table, pattern, costs[64], (64, 96, 128), 100, space) == 64
    assert table.largest_width_meeting(pattern, costs[64] * 0.99, (64, 96, 128), 100, space) is None


def test_table_round_trips_and_rejects_bad_input():
    table = synthetic_table(with_dims=True)
    again = LatencyTable.from_dict(json.loads(json.dumps(table.to_dict())))
    lo = layout(["attention", "ffn", "mamba2"], 96)
    assert again.predict_decode_ms(lo, 200) == table.predict_decode_ms(lo, 200)
    with pytest.raises(ValueError, match="prefill_ms"):
        table.predict_prefill_ms(layout(["attention"], 64), 100)  # attention has no prefill entries
    with pytest.raises(ValueError, match="unknown operator"):
        LatencyTable(
            [{"operator": "nope", "d_model": 64, "context": 1, "decode_ms": 1}],
            [{"d_model": 64, "context": 1, "decode_ms": 1}],
        )
    with pytest.raises(ValueError, match="overhead"):
        LatencyTable([], [])
    with pytest.raises(ValueError, match="non-negative"):
        LatencyTable([], [{"d_model": 64, "context": 1, "decode_ms": -1}])
    with pytest.raises(ValueError, match="version"):
        LatencyTable.from_dict({"version": 99, "entries": [], "overhead": []})


def test_latency_model_imports_without_torch():
    code = "import sys, search.latency_model; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.fixture(scope="module")
def tiny_lut():
    from latency.lut import build_lut
    from latency.profiler import LatencyConfig

    config = LatencyConfig(decode_tokens=4, repeats=2, warmup=1, threads=1, throughput=False)
    started = time.perf_counter()
    lut = build_lut([32, 64], [8], ["mamba2", "ffn"], DIMS, config, "cpu", copies=2, rounds=1)
    return lut, time.perf_counter() - started


def test_tiny_real_build(tiny_lut, tmp_path):
    from latency.lut import load_lut, save_lut

    lut, _ = tiny_lut  # its build time is a benchmark's business (benchmarks/latency_cpu.py), not a test's
    assert {(e["operator"], e["d_model"], e["context"]) for e in lut["entries"]} == {
        (op, w, 8) for op in ("mamba2", "ffn") for w in (32, 64)
    }
    # A cost the machine's noise buries is stored as 0 with a warning (a busy CI machine does that): never
    # negative, and most are measured.
    assert all(e["decode_ms"] >= 0 and e["prefill_ms"] >= 0 for e in lut["entries"])
    assert sum(e["decode_ms"] > 0 for e in lut["entries"]) >= len(lut["entries"]) // 2
    assert all(e["decode_ms"] > 0 for e in lut["overhead"])
    assert lut["device_fingerprint"]["threads"] == 1 and len(lut["fingerprint_hash"]) == 64
    assert lut["size_curve"] and all(
        r["factor"] > 0 for r in lut["size_curve"]
    )  # CPU: a size curve by default
    for width in (32, 64):
        factors = [
            r["factor"]
            for r in sorted(lut["size_curve"], key=lambda r: r["weight_bytes"])
            if r["d_model"] == width
        ]
        assert factors == sorted(factors)  # non-decreasing fit
    path = save_lut(lut, tmp_path / "sub" / "lut.json")
    assert load_lut(path) == json.loads(json.dumps(lut))
    assert not [p for p in path.parent.iterdir() if p.name != "lut.json"]  # no temporary file left behind
    table = LatencyTable.load(path)
    lo = Layout.from_dict(
        {
            "operators": ["mamba2", "ffn"],
            **SearchSpace(mixers=("mamba2",), widths=(48,), dims=DIMS)._dims_for(48),
        }
    )
    assert table.predict_decode_ms(lo, 8) > 0  # width 48 interpolated between 32 and 64


def test_confirm_and_its_guards(tiny_lut):
    from latency.lut import confirm

    lut, _ = tiny_lut
    lo = Layout.from_dict(
        {
            "operators": ["mamba2", "ffn"],
            **SearchSpace(mixers=("mamba2",), widths=(64,), dims=DIMS)._dims_for(64),
        }
    )
    predicted, measured, rel = confirm(lo, lut)
    assert predicted > 0 and measured > 0 and rel == pytest.approx((predicted - measured) / measured)
    with pytest.raises(ValueError, match="threads"):
        confirm(lo, lut, {**lut["config"], "prompt_len": 8, "threads": 2})


def test_cli_build_and_predict(tmp_path):
    from typer.testing import CliRunner

    from api.cli_latency import latency_app

    runner = CliRunner()
    out = tmp_path / "lut.json"
    result = runner.invoke(
        latency_app,
        [
            "build-lut",
            "--out",
            str(out),
            "--widths",
            "64,128",
            "--contexts",
            "8",
            "--operators",
            "attention,ffn",
            "--repeats",
            "1",
            "--decode-tokens",
            "2",
            "--copies",
            "1",
            "--rounds",
            "1",
            "--threads",
            "1",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.exists() and "attention" in result.output
    result = runner.invoke(
        latency_app, ["predict", "llama", "--lut", str(out), "--context", "8", "--target-ms", "1000"]
    )
    assert result.exit_code == 0, result.output
    assert "predicted decode" in result.output and "largest width meeting 1000" in result.output
    assert "128" in result.output
    result = runner.invoke(latency_app, ["predict", "llama", "--lut", str(out), "--context", "8", "--json"])
    data = json.loads(result.output)
    assert data["operators"]["attention"]["count"] == 12
    result = runner.invoke(latency_app, ["predict", "mamba2", "--lut", str(out), "--context", "8"])
    assert result.exit_code == 1 and "mamba2" in result.output
