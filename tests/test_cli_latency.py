"""`hybridnas latency build-lut`: resumable per measured cell (an interrupted build keeps its cells, a rerun
measures only the missing ones, other settings never reuse them), exit 130 on Ctrl-C, plain progress lines
on stderr when not on a terminal; the table stays readable by `latency predict`."""

import json

import pytest
from typer.testing import CliRunner

import latency.lut as lut_module
from api.cli_latency import latency_app
from latency.lut import CellStore, cell_key, cells_path

WIDTHS, CONTEXTS = (64, 128), (8, 16)
ALL_CELLS = {(w, c) for w in WIDTHS for c in CONTEXTS}


def build_args(out, *extra):
    return [
        "build-lut",
        "--out",
        str(out),
        "--widths",
        ",".join(map(str, WIDTHS)),
        "--contexts",
        ",".join(map(str, CONTEXTS)),
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
        "--size-levels-mb",
        "none",
        *extra,
    ]


@pytest.fixture
def measured(monkeypatch):
    """The (width, context) of every cell really measured; `stop_after[0]` = k raises KeyboardInterrupt
    when the (k+1)-th cell of a command would be measured (None: never)."""
    real = lut_module._measure_cell
    calls: list[tuple[int, int]] = []
    stop_after: list[int | None] = [None]
    started = [0]

    def spy(empty, models, ref_models, operators, reference, cfg, device, rounds, copies):
        if stop_after[0] is not None and len(calls) - started[0] >= stop_after[0]:
            raise KeyboardInterrupt
        calls.append((empty.layout.d_model, cfg.prompt_len))
        return real(empty, models, ref_models, operators, reference, cfg, device, rounds, copies)

    monkeypatch.setattr(lut_module, "_measure_cell", spy)

    def command(stop: int | None = None) -> list[tuple[int, int]]:
        """Start a new command's count; the cells measured so far in it are `calls[started:]`."""
        stop_after[0], started[0] = stop, len(calls)
        return calls

    return command


def table_keys(table: dict) -> dict:
    return {
        "entries": sorted((e["operator"], e["d_model"], e["context"]) for e in table["entries"]),
        "overhead": sorted((e["d_model"], e["context"]) for e in table["overhead"]),
        "size_curve": sorted((r["d_model"], r["context"], r["n_blocks"]) for r in table["size_curve"]),
        **{k: table[k] for k in ("widths", "contexts", "operators", "dims", "config", "cell_keys")},
    }


def test_interrupted_build_resumes_only_the_missing_cells(tmp_path, measured):
    runner = CliRunner()
    out = tmp_path / "lut.json"
    cells = cells_path(out)

    calls = measured(stop=2)  # Ctrl-C while measuring the third cell
    result = runner.invoke(latency_app, build_args(out))
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr and "2 of 4" in result.stderr
    first = list(calls)
    assert len(first) == 2
    assert not out.exists()  # no partial table for `predict` to read
    assert len(CellStore(cells).load()) == 2  # ... but both finished cells are on disk

    calls = measured()
    result = runner.invoke(latency_app, build_args(out))
    assert result.exit_code == 0, result.output
    second = calls[len(first) :]
    assert sorted(second) == sorted(ALL_CELLS - set(first))  # only the missing cells were measured
    assert "resuming: 2 of 4" in result.stderr
    resumed = json.loads(out.read_text())
    assert resumed["resumed_cells"] == 2
    assert not cells.exists()  # the table holds every cell now

    full_out = tmp_path / "full.json"
    calls = measured()
    result = runner.invoke(latency_app, build_args(full_out))
    assert result.exit_code == 0, result.output
    assert sorted(calls[len(first) + len(second) :]) == sorted(ALL_CELLS)
    assert table_keys(resumed) == table_keys(json.loads(full_out.read_text()))

    # the resumed table reads as any other
    result = runner.invoke(latency_app, ["predict", "llama", "--lut", str(out), "--context", "8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["operators"]["attention"]["count"] == 12


def test_other_settings_never_reuse_cells(tmp_path, measured):
    runner = CliRunner()
    out = tmp_path / "lut.json"
    calls = measured(stop=3)
    assert runner.invoke(latency_app, build_args(out)).exit_code == 130
    assert len(calls) == 3

    calls = measured()
    result = runner.invoke(latency_app, build_args(out, "--decode-tokens", "3"))
    assert result.exit_code == 0, result.output
    assert sorted(calls[3:]) == sorted(ALL_CELLS)  # nothing measured with 2 decode tokens was reused
    assert json.loads(out.read_text())["config"]["decode_tokens"] == 3
    # the first settings' cells are still there, and still resume
    assert len(CellStore(cells_path(out)).load()) == 3
    calls = measured()
    assert runner.invoke(latency_app, build_args(out)).exit_code == 0
    assert len(calls) == 3 + 4 + 1
    assert not cells_path(out).exists()


def test_cell_key_follows_every_setting():
    settings = {"config": {"decode_tokens": 2, "dtype": "fp32"}, "device": "cpu", "fingerprint_hash": "a"}
    dims = {"d_model": 32, "n_heads": 1}
    base = cell_key(settings, 32, 8, dims)
    assert base == cell_key(dict(settings), 32, 8, dict(dims))
    changed = [
        cell_key({**settings, "device": "cuda:0"}, 32, 8, dims),
        cell_key({**settings, "fingerprint_hash": "b"}, 32, 8, dims),
        cell_key({**settings, "config": {"decode_tokens": 2, "dtype": "bf16"}}, 32, 8, dims),
        cell_key({**settings, "size_levels_mb": [8.0]}, 32, 8, dims),
        cell_key(settings, 64, 8, dims),
        cell_key(settings, 32, 16, dims),
        cell_key(settings, 32, 8, {**dims, "n_heads": 2}),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_cells_file_survives_a_torn_line(tmp_path):
    store = CellStore(tmp_path / "c.jsonl")
    store.append({"key": "a", "seconds": 1})
    with store.path.open("a") as fh:
        fh.write('{"format": 1, "key": "b", "sec')  # killed in the middle of a write
    store.append({"key": "c", "seconds": 2})
    assert sorted(store.load()) == ["a", "c"]
    store.discard(["a"])
    assert sorted(store.load()) == ["c"]
    store.discard(["c"])
    assert not store.path.exists()


def test_plain_progress_lines_on_stderr(tmp_path):
    result = CliRunner().invoke(latency_app, build_args(tmp_path / "lut.json"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("measuring cells: ")]
    assert lines and lines[-1].startswith("measuring cells: 4/4") and "eta" in lines[-1]
    assert "\x1b[" not in result.stderr  # no control characters off a terminal
    assert "measuring cells" not in result.stdout


def test_bad_latency_option_exits_2_naming_it(tmp_path):
    result = CliRunner().invoke(latency_app, build_args(tmp_path / "lut.json", "--decode-tokens", "0"))
    assert result.exit_code == 2 and "--decode-tokens" in result.stderr
