"""The grammar as a generator: sampling, size, decoding and one-factor mutations. search/ has no torch."""

import random
import subprocess
import sys

import pytest

from search.presets import get_preset
from search.space import MUTATION_KINDS, SearchSpace, SpaceError, cpu_space


def small_space(**kw):
    settings = dict(
        mixers=("attention", "deltanet"),
        ratios=((0, 1), (1, 1)),
        ffn_counts=(0, 1),
        n_stages=2,
        max_operators=8,
        widths=(64, 128),
        dims={"head_dim": 16, "kv_group": 2},
    )
    settings.update(kw)
    return SearchSpace(**settings)


def test_search_package_does_not_import_torch():
    code = (
        "import sys, search.layout, search.space, search.params, search.presets, search.operators; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_size_matches_enumeration():
    space = small_space()
    genomes = list(space.enumerate())
    assert len(genomes) == space.size()
    assert len(set(genomes)) == len(genomes)
    for g in genomes:
        assert g.n_operators <= space.max_operators


def test_paper_space_block_types():
    space = SearchSpace()
    # 3 single-type blocks + 6 ordered pairs x 3 ratios, each with 0/1/2 FFNs.
    assert len(space.block_types) == (3 + 6 * 3) * 3
    assert space.size() > 10**6


def test_samples_are_valid_and_decode_back():
    space = cpu_space()
    rng = random.Random(1)
    for _ in range(300):
        genome = space.sample(rng)
        layout = space.to_layout(genome)
        assert len(layout.operators) <= space.max_operators
        assert len(genome.stages) == space.n_stages
        decoded = space.decode(layout)
        assert decoded is not None and space.to_layout(decoded) == layout


def test_mutation_changes_exactly_one_factor():
    space = SearchSpace(
        mixers=("attention", "mamba2", "deltanet"), max_operators=30, widths=(1024, 1280, 1536)
    )
    rng = random.Random(7)
    seen = set()
    for _ in range(400):
        parent = space.sample(rng)
        child, mutation = space.mutate(parent, rng)
        seen.add(mutation.kind)
        assert child != parent and child.n_operators <= space.max_operators
        changed_width = child.d_model != parent.d_model
        changed_stages = [i for i, (a, b) in enumerate(zip(parent.stages, child.stages)) if a != b]
        if mutation.kind == "width":
            assert changed_width and not changed_stages
        elif mutation.kind == "blocks":
            assert not changed_width
            assert all(a.block == b.block for a, b in zip(parent.stages, child.stages))
        else:
            assert not changed_width
            blocks_changed = [
                i for i, (a, b) in enumerate(zip(parent.stages, child.stages)) if a.block != b.block
            ]
            assert len(blocks_changed) == 1, mutation
            a, b = parent.stages[blocks_changed[0]].block, child.stages[blocks_changed[0]].block
            if mutation.kind == "ffn":
                assert a.mixers == b.mixers and a.ratio == b.ratio and a.ffns != b.ffns
            if mutation.kind == "ratio":
                assert a.ratio != b.ratio and a.ffns == b.ffns
            if mutation.kind == "operator":
                assert a.ratio == b.ratio and a.ffns == b.ffns and a.mixers != b.mixers
    assert seen == set(MUTATION_KINDS)


def test_layout_outside_grammar_mutates_at_operator_level():
    space = SearchSpace()
    flash = get_preset("nemotron-flash-1b")
    assert space.decode(flash) is None  # its blocks alternate: not one block type per stage
    rng = random.Random(3)
    kinds = set()
    for _ in range(60):
        child, mutation = space.mutate_layout(flash, rng)
        kinds.add(mutation.kind)
        assert child != flash
        child.validate()
        if mutation.kind == "swap":
            assert len(child.operators) == len(flash.operators)
            assert sum(a != b for a, b in zip(child.operators, flash.operators)) == 1
        elif mutation.kind == "insert":
            assert len(child.operators) == len(flash.operators) + 2
        elif mutation.kind == "remove":
            assert len(child.operators) == len(flash.operators) - 2
    assert {"swap", "insert", "remove", "width"} <= kinds


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"mixers": ()}, "mixers"),
        ({"mixers": ("ffn",)}, "mixers"),
        ({"mixers": ("attention", "warp")}, "mixers"),
        ({"max_operators": 1}, "max_operators"),
        ({"widths": (100,)}, "widths"),
        ({"widths": (10**20,)}, "widths"),  # refused at once, not after dividing 10^18 heads
        ({"ratios": ((2, 0),)}, "ratios"),
    ],
)
def test_bad_space_config(kw, field):
    with pytest.raises(SpaceError) as info:
        small_space(**kw)
    assert info.value.field == field


def test_random_layouts_are_reproducible():
    a = [cpu_space().sample_layout(random.Random(5)).content_hash for _ in range(3)]
    assert len(set(a)) == 1
