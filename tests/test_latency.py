"""The latency profiler: statistics, cache bytes, fingerprints, and that decoding is real work."""

import pytest
import torch

from latency.profiler import LatencyConfig, Stat, device_fingerprint, fingerprint_hash, profile
from models.hybrid import HybridLM
from search.layout import Layout

DIMS = {
    "d_model": 32,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 8,
    "mamba_head_dim": 16,
    "mamba_d_state": 8,
    "swa_window": 6,
}


def test_stat_median_and_iqr():
    stat = Stat.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert stat.median == 3.0 and stat.iqr == pytest.approx(2.0) and stat.repeats == 5
    assert Stat.of([7.0]).iqr == 0.0


def test_cache_bytes_per_sequence_follow_the_operator_kind():
    cfg = LatencyConfig(prompt_len=10, decode_tokens=6, repeats=2, throughput=False)
    attention = HybridLM(Layout.from_dict({"operators": "A", **DIMS}), 50)
    result = profile(attention, cfg, "cpu")
    buffer = 16
    assert result.cache_buffer_tokens == buffer
    assert result.cache_bytes_per_sequence == 2 * 2 * 8 * buffer * 4  # K and V, 2 KV heads x 8, fp32
    # a recurrent mixer's state does not grow with the context
    mamba = HybridLM(Layout.from_dict({"operators": "M2", **DIMS}), 50)
    short = profile(mamba, cfg, "cpu").cache_bytes_per_sequence
    longer = profile(mamba, LatencyConfig(prompt_len=40, decode_tokens=6, repeats=2, throughput=False), "cpu")
    assert short == longer.cache_bytes_per_sequence > 0
    # a sliding window's cache is bounded by the window
    swa = HybridLM(Layout.from_dict({"operators": "S", **DIMS}), 50)
    assert (
        profile(
            swa, LatencyConfig(prompt_len=40, decode_tokens=6, repeats=2, throughput=False), "cpu"
        ).cache_bytes_per_sequence
        < 2 * 2 * 8 * 46 * 4
    )


def test_profile_reports_every_metric_with_its_repeats():
    model = HybridLM(Layout.from_dict({"operators": "D F A F", **DIMS}), 50)
    result = profile(
        model, LatencyConfig(prompt_len=16, decode_tokens=8, repeats=3, throughput_max_batch=4), "cpu"
    )
    for stat in (result.decode_ms_per_token, result.prefill_ms, result.throughput_tokens_per_s):
        assert stat.repeats >= 1 and stat.median > 0 and len(stat.values) == stat.repeats
    assert result.decode_ms_per_token.repeats == 3
    assert result.throughput_batch == 4
    fp = result.fingerprint
    for key in ("device", "torch", "dtype", "threads", "method"):
        assert fp[key] is not None
    assert fp["method"] == "eager" and fp["dtype"] == "float32"


def test_more_layers_take_longer():
    few = HybridLM(Layout.from_dict({"operators": "[A F] x 1", **DIMS}), 50)
    many = HybridLM(Layout.from_dict({"operators": "[A F] x 12", **DIMS}), 50)
    cfg = LatencyConfig(prompt_len=8, decode_tokens=16, repeats=3, throughput=False)
    assert (
        profile(many, cfg, "cpu").decode_ms_per_token.median
        > 2 * profile(few, cfg, "cpu").decode_ms_per_token.median
    )


def test_fingerprint_hash_separates_devices_and_methods():
    cpu = device_fingerprint(torch.device("cpu"), torch.float32, "eager")
    assert fingerprint_hash(cpu) == fingerprint_hash(dict(cpu))
    assert fingerprint_hash(cpu) != fingerprint_hash({**cpu, "threads": cpu["threads"] + 1})
    assert fingerprint_hash(cpu) != fingerprint_hash({**cpu, "dtype": "bfloat16"})


@pytest.mark.parametrize(
    "kw, field",
    [({"decode_tokens": 0}, "decode_tokens"), ({"method": "magic"}, "method"), ({"dtype": "fp8"}, "dtype")],
)
def test_bad_latency_config(kw, field):
    with pytest.raises(ValueError, match=field):
        LatencyConfig(**kw)


def test_cuda_graph_needs_cuda():
    model = HybridLM(Layout.from_dict({"operators": "A", **DIMS}), 50)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="cuda-graph"):
        profile(model, LatencyConfig(method="cuda-graph", repeats=1, decode_tokens=2, prompt_len=2), "cpu")
