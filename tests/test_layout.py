"""Layouts: validation errors name the field, hashes are stable, analytic counts match the paper."""

import json
import subprocess
import sys

import pytest

from search.layout import Layout, LayoutError, LayoutLimits, load_layout
from search.params import count_parameters
from search.presets import CPU_PRESETS, FULL_PRESETS, get_preset, preset_names

BASE = {"d_model": 64, "n_heads": 4, "n_kv_heads": 2}


DEFAULT_LIMITS = LayoutLimits()


def error_of(data, limits=DEFAULT_LIMITS):
    with pytest.raises(LayoutError) as info:
        Layout.from_dict(data, limits)
    return info.value


@pytest.mark.parametrize(
    "data, field, words",
    [
        ({**BASE, "operators": "D F mamba3 F"}, "operators", "'mamba3'"),
        ({**BASE, "operators": ["deltanet", "ffn", "warp_drive"]}, "operators[2]", "'warp_drive'"),
        ({**BASE, "operators": "A F", "n_heads": 5}, "n_heads", "do not divide d_model=64"),
        ({**BASE, "operators": "A F", "n_kv_heads": 3}, "n_kv_heads", "do not divide n_heads=4"),
        ({**BASE, "operators": "S F", "swa_window": 0}, "swa_window", "positive"),
        ({**BASE, "operators": "S F", "swa_window": -5}, "swa_window", "positive"),
        ({**BASE, "operators": "A F", "d_model": 1 << 20}, "d_model", "exceeds the limit"),
        ({**BASE, "operators": "[A F] x 100"}, "operators", "more than 128"),
        ({**BASE, "operators": "F F"}, "operators", "token mixer"),
        ({**BASE, "operators": ""}, "operators", "empty"),
        ({**BASE, "operators": "M2", "mamba_head_dim": 48}, "mamba_head_dim", "does not divide"),
        ({**BASE, "operators": "A", "colour": "red"}, "colour", "unknown field"),
        ({**BASE, "operators": "A", "d_model": "wide"}, "d_model", "must be an integer"),
        ({**BASE, "operators": "A", "meta_tokens": -1}, "meta_tokens", "between 0"),
        ({**BASE, "operators": "[A F"}, "operators", "missing ']'"),
        ({**BASE, "operators": "A F x 2"}, "operators", "must follow a bracketed group"),
        ({**BASE, "operators": "A F", "stages": []}, "operators", "exactly one"),
    ],
)
def test_bad_input_names_the_field(data, field, words):
    err = error_of(data)
    assert err.field == field, str(err)
    assert words in err.reason, str(err)


def test_configured_limits_apply():
    err = error_of({**BASE, "operators": "[A F] x 4"}, LayoutLimits(max_operators=6))
    assert err.field == "operators" and "6" in err.reason
    err = error_of({**BASE, "operators": "A"}, LayoutLimits(max_d_model=32))
    assert err.field == "d_model"


def test_same_architecture_same_hash_however_written():
    ways = [
        {**BASE, "operators": "D F M2 F D F M2 F"},
        {**BASE, "operators": "[D F M2 F] x 2"},
        {**BASE, "operators": "(deltanet ffn mamba2 ffn)*2"},
        {**BASE, "operators": [{"repeat": 2, "operators": ["D", "F", "M2", "F"]}]},
        {**BASE, "stages": [{"block": "D F M2 F", "repeat": 2}]},
        # head_dim spelled out, an unused dim changed, a name and a vocabulary added: same architecture.
        {
            **BASE,
            "head_dim": 16,
            "swa_window": 77,
            "name": "x",
            "vocab_size": 99,
            "operators": ["deltanet", "ffn", "mamba2", "ffn"] * 2,
        },
    ]
    hashes = {Layout.from_dict(w).content_hash for w in ways}
    assert len(hashes) == 1


def test_hash_changes_with_architecture():
    base = Layout.from_dict({**BASE, "operators": "D F M2 F"})
    variants = [
        {**BASE, "operators": "M2 F D F"},
        {**BASE, "operators": "D F M2 F", "d_model": 128},
        {**BASE, "operators": "D F M2 F", "ffn_ratio": 4},
        {**BASE, "operators": "D F M2 F", "meta_tokens": 8},
        {**BASE, "operators": "D F M2 F", "tied_embeddings": False},
        {**BASE, "operators": "D F M2 F", "conv_size": 3},
    ]
    seen = {base.content_hash}
    for v in variants:
        h = Layout.from_dict(v).content_hash
        assert h not in seen, v
        seen.add(h)


def test_hash_is_stable_across_processes():
    code = (
        "from search.presets import get_preset; import sys; "
        "sys.stdout.write(get_preset('nemotron-flash-1b').content_hash)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    ).stdout
    assert out == get_preset("nemotron-flash-1b").content_hash


def test_canonical_json_round_trips(tmp_path):
    for name in preset_names():
        layout = get_preset(name)
        path = tmp_path / f"{name}.json"
        path.write_text(layout.to_json())
        again = load_layout(path)
        assert again == layout and again.content_hash == layout.content_hash
        assert json.loads(layout.canonical_json())["operators"] == list(layout.operators)


def test_yaml_layout_file(tmp_path):
    path = tmp_path / "l.yaml"
    path.write_text("operators: '[A F] x 2'\nd_model: 64\nn_heads: 4\nn_kv_heads: 2\n")
    assert load_layout(path).operators == ("attention", "ffn") * 2


def test_missing_file_is_a_layout_error(tmp_path):
    with pytest.raises(LayoutError, match="file not found"):
        load_layout(tmp_path / "nope.json")


@pytest.mark.parametrize("name, published", [("nemotron-flash-1b", 0.96e9), ("nemotron-flash-3b", 2.7e9)])
def test_published_sizes(name, published):
    count = count_parameters(get_preset(name))
    assert abs(count.total - published) / published <= 0.03, count


def test_flash_pattern_operator_mix():
    from collections import Counter

    assert Counter(get_preset("nemotron-flash-1b").operators) == {
        "ffn": 12,
        "mamba2": 6,
        "deltanet": 4,
        "attention": 2,
    }
    assert Counter(get_preset("nemotron-flash-3b").operators) == {
        "ffn": 18,
        "mamba2": 9,
        "deltanet": 6,
        "attention": 3,
    }


def test_cpu_presets_share_the_flash_pattern_and_width():
    for name in CPU_PRESETS:
        layout = get_preset(name)
        assert 64 <= layout.d_model <= 256
    assert get_preset("nemotron-flash-1b-mini").operators == get_preset("nemotron-flash-1b").operators
    assert set(FULL_PRESETS) | set(CPU_PRESETS) == set(preset_names())


def test_count_needs_a_vocabulary():
    layout = Layout.from_dict({**BASE, "operators": "A F"})
    with pytest.raises(LayoutError, match="vocab_size"):
        count_parameters(layout)
    tied = count_parameters(layout, 100)
    untied = count_parameters(layout.replace(tied_embeddings=False), 100)
    assert untied.total - tied.total == 100 * 64
    assert untied.non_embedding == tied.non_embedding
