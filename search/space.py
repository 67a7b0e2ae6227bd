"""The search space: the paper's layout grammar as a generator (method.md section 4).

A network is `n_stages` stages; each stage repeats one block type; a block type holds at most 2 token-mixer
types mixed at a ratio (0:1 = one type, 1:1, 1:2, 1:3), each mixer followed by 0, 1 or 2 FFNs; at most
`max_operators` operators in total (the last stage is trimmed first). The grammar samples random layouts,
counts its size and defines the one-factor mutations the search uses. It is a generator, not a validity
rule: a layout outside it (the final Nemotron-Flash models alternate blocks) is still a valid `Layout`, and
mutates at operator level (`mutate_layout`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from search.layout import Layout, LayoutError
from search.operators import OPERATORS

SINGLE = (0, 1)
PAPER_RATIOS = ((0, 1), (1, 1), (1, 2), (1, 3))
PAPER_WIDTHS = tuple(range(1024, 2561, 256))
MUTATION_KINDS = ("operator", "ratio", "ffn", "blocks", "width")


@dataclass(frozen=True)
class BlockType:
    mixers: tuple[str, ...]  # one mixer type (ratio 0:1) or two distinct ones
    ratio: tuple[int, int]  # mixers[0] : mixers[1] counts; (0, 1) for a single type
    ffns: int  # FFNs after each mixer

    def mixer_counts(self) -> tuple[int, ...]:
        return (1,) if self.ratio == SINGLE else self.ratio

    def operators(self) -> list[str]:
        seq: list[str] = []
        for mixer, count in zip(self.mixers, self.mixer_counts()):
            seq.extend(([mixer] + ["ffn"] * self.ffns) * count)
        return seq

    @property
    def size(self) -> int:
        return sum(self.mixer_counts()) * (1 + self.ffns)

    def describe(self) -> str:
        return " ".join(OPERATORS[op].code for op in self.operators())


@dataclass(frozen=True)
class Stage:
    block: BlockType
    n_blocks: int


@dataclass(frozen=True)
class Genome:
    stages: tuple[Stage, ...]
    d_model: int

    @property
    def n_operators(self) -> int:
        return sum(stage.block.size * stage.n_blocks for stage in self.stages)

    def operators(self) -> list[str]:
        return [op for stage in self.stages for op in stage.block.operators() * stage.n_blocks]


@dataclass(frozen=True)
class Mutation:
    kind: str  # one of MUTATION_KINDS, or an operator-level kind ("swap", "insert", "remove")
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "detail": self.detail}


class SpaceError(ValueError):
    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class SearchSpace:
    mixers: tuple[str, ...] = ("attention", "mamba2", "deltanet")
    ratios: tuple[tuple[int, int], ...] = PAPER_RATIOS
    ffn_counts: tuple[int, ...] = (0, 1, 2)
    n_stages: int = 3
    max_operators: int = 30
    widths: tuple[int, ...] = PAPER_WIDTHS
    # The other dims of every layout (heads follow the width: n_heads = d_model // head_dim).
    dims: dict[str, Any] = field(default_factory=lambda: {"head_dim": 128, "kv_group": 4})

    def __post_init__(self) -> None:
        if not self.mixers:
            raise SpaceError("mixers", "is empty")
        for name in self.mixers:
            if name not in OPERATORS or OPERATORS[name].kind != "mixer":
                raise SpaceError(
                    "mixers",
                    f"{name!r} is not a token mixer (known: "
                    f"{', '.join(n for n, s in OPERATORS.items() if s.kind == 'mixer')})",
                )
        if len(set(self.mixers)) != len(self.mixers):
            raise SpaceError("mixers", "contains duplicates")
        for ratio in self.ratios:
            if tuple(ratio) != SINGLE and (len(ratio) != 2 or min(ratio) < 1):
                raise SpaceError("ratios", f"{ratio} is not (0, 1) or a pair of positive counts")
        if not self.ratios:
            raise SpaceError("ratios", "is empty")
        if not self.ffn_counts or min(self.ffn_counts) < 0:
            raise SpaceError("ffn_counts", "must be non-empty and non-negative")
        if self.n_stages < 1:
            raise SpaceError("n_stages", "must be at least 1")
        if not self.widths or min(self.widths) <= 0:
            raise SpaceError("widths", "must be non-empty and positive")
        from search.layout import DEFAULT_LIMITS

        if max(self.widths) > DEFAULT_LIMITS.max_d_model:
            raise SpaceError(
                "widths", f"{max(self.widths)} exceeds the limit of {DEFAULT_LIMITS.max_d_model}"
            )
        if self.max_operators > DEFAULT_LIMITS.max_operators:
            raise SpaceError(
                "max_operators", f"{self.max_operators} exceeds the limit of {DEFAULT_LIMITS.max_operators}"
            )
        if not self.block_types:
            raise SpaceError("ratios", "no block type can be formed (two-mixer ratios need two mixers)")
        if self.n_stages * min(b.size for b in self.block_types) > self.max_operators:
            raise SpaceError("max_operators", f"{self.max_operators} is too small for {self.n_stages} stages")
        for width in self.widths:  # every width must give a valid layout
            self._dims_for(width)

    # ---- the grammar -------------------------------------------------------------------------------------
    @cached_property
    def block_types(self) -> tuple[BlockType, ...]:
        types: list[BlockType] = []
        for ratio in self.ratios:
            ratio = tuple(ratio)
            for ffns in self.ffn_counts:
                if ratio == SINGLE:
                    types.extend(BlockType((m,), SINGLE, ffns) for m in self.mixers)
                else:
                    types.extend(
                        BlockType((a, b), ratio, ffns) for a in self.mixers for b in self.mixers if a != b
                    )
        return tuple(types)

    def size(self) -> int:
        """Number of genomes (stage block types x block counts x widths) within the operator limit."""
        # ways[n] = number of ways to fill the stages so far with n operators in total.
        ways = {0: 1}
        for _ in range(self.n_stages):
            nxt: dict[int, int] = {}
            for used, count in ways.items():
                for block in self.block_types:
                    for n_blocks in range(1, (self.max_operators - used) // block.size + 1):
                        total = used + block.size * n_blocks
                        nxt[total] = nxt.get(total, 0) + count
            ways = nxt
        return sum(ways.values()) * len(self.widths)

    def enumerate(self) -> Iterator[Genome]:
        """Every genome (for small closed spaces; see `size()` first)."""

        def rec(prefix: tuple[Stage, ...], used: int) -> Iterator[tuple[Stage, ...]]:
            if len(prefix) == self.n_stages:
                yield prefix
                return
            for block in self.block_types:
                for n_blocks in range(1, (self.max_operators - used) // block.size + 1):
                    yield from rec(prefix + (Stage(block, n_blocks),), used + block.size * n_blocks)

        for width in self.widths:
            for stages in rec((), 0):
                yield Genome(stages, width)

    def sample(self, rng: random.Random) -> Genome:
        while True:
            blocks = [rng.choice(self.block_types) for _ in range(self.n_stages)]
            counts = [rng.randint(1, max(1, self.max_operators // b.size)) for b in blocks]
            if sum(b.size for b in blocks) > self.max_operators:
                continue
            # Trim the last stage first (method.md: at most N operators, trim the last stage).
            for index in reversed(range(self.n_stages)):
                while (
                    counts[index] > 1 and sum(b.size * c for b, c in zip(blocks, counts)) > self.max_operators
                ):
                    counts[index] -= 1
            return Genome(tuple(Stage(b, c) for b, c in zip(blocks, counts)), rng.choice(self.widths))

    def sample_layout(self, rng: random.Random) -> Layout:
        return self.to_layout(self.sample(rng))

    def _completions(self, stage: int, used: int) -> int:
        """Number of ways to fill stages `stage..` when `used` operators are taken (memoised)."""
        memo = self.__dict__.setdefault("_completions_memo", {})
        key = (stage, used)
        if key not in memo:
            if stage == self.n_stages:
                memo[key] = 1
            else:
                memo[key] = sum(
                    self._completions(stage + 1, used + b.size * n)
                    for b in self.block_types
                    for n in range(1, (self.max_operators - used) // b.size + 1)
                )
        return memo[key]

    def sample_uniform(self, rng: random.Random) -> Genome:
        """A genome drawn uniformly from all genomes of the grammar (`sample` follows the paper's trimming
        rule, which favours layouts near the operator limit; this one gives every genome the same chance)."""
        stages, used = [], 0
        for index in range(self.n_stages):
            options = [
                (b, n) for b in self.block_types for n in range(1, (self.max_operators - used) // b.size + 1)
            ]
            weights = [self._completions(index + 1, used + b.size * n) for b, n in options]
            block, n_blocks = rng.choices(options, weights=weights)[0]
            stages.append(Stage(block, n_blocks))
            used += block.size * n_blocks
        return Genome(tuple(stages), rng.choice(self.widths))

    def sample_uniform_layout(self, rng: random.Random) -> Layout:
        return self.to_layout(self.sample_uniform(rng))

    # ---- genome <-> layout -------------------------------------------------------------------------------
    def _dims_for(self, width: int) -> dict[str, Any]:
        dims = {k: v for k, v in self.dims.items() if k != "kv_group"}
        head_dim = dims.get("head_dim", 128)
        if width % head_dim:
            raise SpaceError("widths", f"width {width} is not a multiple of head_dim={head_dim}")
        n_heads = width // head_dim
        kv_group = self.dims.get("kv_group", 1)
        # The largest KV-head count that divides n_heads and keeps at least `kv_group` queries per KV head.
        n_kv = max(k for k in range(1, n_heads + 1) if n_heads % k == 0 and k <= max(1, n_heads // kv_group))
        dims.update(d_model=width, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim)
        try:
            Layout.from_dict({"operators": list(self.mixers), **dims})
        except LayoutError as exc:
            raise SpaceError(f"dims.{exc.field}", f"at width {width}: {exc.reason}") from None
        return dims

    def to_layout(self, genome: Genome, name: str | None = None) -> Layout:
        return Layout.from_dict(
            {"operators": genome.operators(), "name": name, **self._dims_for(genome.d_model)}
        )

    def decode(self, layout: Layout) -> Genome | None:
        """The genome that generates this layout's sequence and width, or None if it is outside the
        grammar."""
        if layout.d_model not in self.widths:
            return None
        ops = list(layout.operators)
        by_ops = {tuple(b.operators()): b for b in self.block_types}
        block_lengths = sorted({b.size for b in self.block_types})

        def rec(start: int, stages_left: int) -> tuple[Stage, ...] | None:
            if stages_left == 0:
                return () if start == len(ops) else None
            for size in block_lengths:
                block = by_ops.get(tuple(ops[start : start + size]))
                if block is None:
                    continue
                n = 1
                while (
                    start + n * size <= len(ops)
                    and ops[start + (n - 1) * size : start + n * size] == ops[start : start + size]
                ):
                    rest = rec(start + n * size, stages_left - 1)
                    if rest is not None:
                        return (Stage(block, n),) + rest
                    n += 1
            return None

        if len(ops) > self.max_operators:
            return None
        stages = rec(0, self.n_stages)
        return None if stages is None else Genome(stages, layout.d_model)

    # ---- one-factor mutations ------------------------------------------------------------------------------
    def mutate(
        self, genome: Genome, rng: random.Random, kinds: tuple[str, ...] = MUTATION_KINDS
    ) -> tuple[Genome, Mutation]:
        """Change exactly one factor: an operator, the mix ratio, the FFN count, the block counts across
        stages, or the width. Retries until the child differs from the parent and fits the grammar."""
        for _ in range(200):
            kind = rng.choice(kinds)
            result = getattr(self, f"_mutate_{kind}")(genome, rng)
            if result is None:
                continue
            child, detail = result
            if child != genome and child.n_operators <= self.max_operators:
                return child, Mutation(kind, detail)
        raise SpaceError("mutation", "no applicable one-factor mutation (the space is a single point?)")

    def _replace_stage(self, genome: Genome, index: int, stage: Stage) -> Genome:
        stages = list(genome.stages)
        stages[index] = stage
        return Genome(tuple(stages), genome.d_model)

    def _mutate_operator(self, genome: Genome, rng: random.Random):
        index = rng.randrange(len(genome.stages))
        stage = genome.stages[index]
        slot = rng.randrange(len(stage.block.mixers))
        options = [m for m in self.mixers if m not in stage.block.mixers]
        if not options:
            return None
        new = rng.choice(options)
        mixers = list(stage.block.mixers)
        old, mixers[slot] = mixers[slot], new
        block = BlockType(tuple(mixers), stage.block.ratio, stage.block.ffns)
        return self._fit(genome, index, block), f"stage {index}: {old} -> {new}"

    def _mutate_ratio(self, genome: Genome, rng: random.Random):
        index = rng.randrange(len(genome.stages))
        stage = genome.stages[index]
        options = [tuple(r) for r in self.ratios if tuple(r) != stage.block.ratio]
        if not options:
            return None
        ratio = rng.choice(options)
        if ratio == SINGLE:
            mixers = (rng.choice(stage.block.mixers),)
        elif stage.block.ratio == SINGLE:
            others = [m for m in self.mixers if m != stage.block.mixers[0]]
            if not others:
                return None
            mixers = (stage.block.mixers[0], rng.choice(others))
        else:
            mixers = stage.block.mixers
        block = BlockType(mixers, ratio, stage.block.ffns)
        return self._fit(genome, index, block), f"stage {index}: ratio {stage.block.ratio} -> {ratio}"

    def _mutate_ffn(self, genome: Genome, rng: random.Random):
        index = rng.randrange(len(genome.stages))
        stage = genome.stages[index]
        options = [f for f in self.ffn_counts if f != stage.block.ffns]
        if not options:
            return None
        ffns = rng.choice(options)
        block = BlockType(stage.block.mixers, stage.block.ratio, ffns)
        return self._fit(genome, index, block), f"stage {index}: FFNs per mixer {stage.block.ffns} -> {ffns}"

    def _mutate_blocks(self, genome: Genome, rng: random.Random):
        counts = [s.n_blocks for s in genome.stages]
        moves = []
        for i in range(len(counts)):
            if counts[i] > 1:
                moves.append((i, None))  # remove a block from stage i
                moves.extend((i, j) for j in range(len(counts)) if j != i)  # move one from i to j
            moves.append((None, i))  # add a block to stage i
        rng.shuffle(moves)
        for src, dst in moves:
            new = list(counts)
            if src is not None:
                new[src] -= 1
            if dst is not None:
                new[dst] += 1
            stages = tuple(Stage(s.block, c) for s, c in zip(genome.stages, new))
            child = Genome(stages, genome.d_model)
            if child.n_operators <= self.max_operators:
                return child, f"blocks {counts} -> {new}"
        return None

    def _mutate_width(self, genome: Genome, rng: random.Random):
        widths = sorted(self.widths)
        i = widths.index(genome.d_model) if genome.d_model in widths else 0
        options = [widths[j] for j in (i - 1, i + 1) if 0 <= j < len(widths)]
        if not options:
            return None
        width = rng.choice(options)
        return Genome(genome.stages, width), f"width {genome.d_model} -> {width}"

    def _fit(self, genome: Genome, index: int, block: BlockType) -> Genome:
        """Put `block` in stage `index`, trimming block counts (last stage first) to stay within the limit."""
        child = self._replace_stage(genome, index, Stage(block, genome.stages[index].n_blocks))
        counts = [s.n_blocks for s in child.stages]
        for i in reversed(range(len(counts))):
            while (
                counts[i] > 1
                and sum(s.block.size * c for s, c in zip(child.stages, counts)) > self.max_operators
            ):
                counts[i] -= 1
        return Genome(tuple(Stage(s.block, c) for s, c in zip(child.stages, counts)), child.d_model)

    def mutate_layout(self, layout: Layout, rng: random.Random) -> tuple[Layout, Mutation]:
        """One-factor mutation of any layout: in the grammar when it decodes, at operator level otherwise
        (swap one mixer; insert or remove a mixer+FFN pair; change the width)."""
        genome = self.decode(layout)
        if genome is not None:
            for _ in range(200):  # different genomes can spell the same sequence: insist on a new layout
                child, mutation = self.mutate(genome, rng)
                child_layout = self.to_layout(child)
                if child_layout != layout:
                    return child_layout, mutation
            raise SpaceError("mutation", "no one-factor mutation changes this layout")
        kinds = {"swap": self._swap, "insert": self._insert, "remove": self._remove, "width": self._rewidth}
        for _ in range(200):
            kind = rng.choice(tuple(kinds))
            changed = kinds[kind](layout, rng)  # None: not applicable to this layout
            if changed is not None and changed[0] != layout:
                child, detail = changed
                return child, Mutation(kind, detail)
        raise SpaceError("mutation", "no applicable operator-level mutation")

    @staticmethod
    def _mixer_positions(ops: list[str]) -> list[int]:
        return [i for i, op in enumerate(ops) if OPERATORS[op].kind == "mixer"]

    def _swap(self, layout: Layout, rng: random.Random) -> tuple[Layout, str] | None:
        ops = list(layout.operators)
        i = rng.choice(self._mixer_positions(ops))
        options = [m for m in self.mixers if m != ops[i]]
        if not options:
            return None
        new = rng.choice(options)
        detail = f"operator {i}: {ops[i]} -> {new}"
        ops[i] = new
        return layout.replace(operators=ops, name=None), detail

    def _insert(self, layout: Layout, rng: random.Random) -> tuple[Layout, str] | None:
        ops = list(layout.operators)
        if len(ops) + 2 > self.max_operators:
            return None
        i = rng.choice(self._mixer_positions(ops) + [len(ops)])
        new = rng.choice(self.mixers)
        ops[i:i] = [new, "ffn"]
        return layout.replace(operators=ops, name=None), f"insert {new}+ffn at {i}"

    def _remove(self, layout: Layout, rng: random.Random) -> tuple[Layout, str] | None:
        ops = list(layout.operators)
        mixers = self._mixer_positions(ops)
        if len(mixers) < 2:
            return None
        i = rng.choice(mixers)
        width = 2 if i + 1 < len(ops) and ops[i + 1] == "ffn" else 1
        detail = f"remove {ops[i]}{'+ffn' if width == 2 else ''} at {i}"
        del ops[i : i + width]
        return layout.replace(operators=ops, name=None), detail

    def _rewidth(self, layout: Layout, rng: random.Random) -> tuple[Layout, str] | None:
        """The next width up or down in the space (any other width for a layout off the space's widths)."""
        widths = sorted(self.widths)
        options = [w for w in widths if w != layout.d_model]
        if layout.d_model in widths:
            i = widths.index(layout.d_model)
            options = [widths[j] for j in (i - 1, i + 1) if 0 <= j < len(widths)]
        if not options:
            return None
        width = rng.choice(options)
        child = Layout.from_dict({**layout.to_dict(), **self._dims_for(width), "name": None})
        return child, f"width {layout.d_model} -> {width}"


def cpu_space(**overrides: Any) -> SearchSpace:
    """The grammar at CPU scale (the fidelity run's dims: d_model 64, at most 12 operators)."""
    settings: dict[str, Any] = dict(
        mixers=("attention", "mamba2", "deltanet"),
        max_operators=12,
        widths=(64,),
        dims={"head_dim": 16, "kv_group": 2, "mamba_head_dim": 16, "mamba_d_state": 16, "swa_window": 64},
    )
    settings.update(overrides)
    return SearchSpace(**settings)


def log10_size(space: SearchSpace) -> float:
    return math.log10(space.size())


def benchmark_space() -> SearchSpace:
    """The closed sub-space evaluated exhaustively for the search-efficiency benchmark: every one-factor
    mutation stays inside it (3 mixers, ratios 0:1 and 1:1, one FFN per mixer, 2 stages, at most 10
    operators, widths 48 and 64): 540 genomes, 396 distinct layouts."""
    return SearchSpace(
        mixers=("attention", "mamba2", "deltanet"),
        ratios=((0, 1), (1, 1)),
        ffn_counts=(1,),
        n_stages=2,
        max_operators=10,
        widths=(48, 64),
        dims={"head_dim": 16, "kv_group": 2, "mamba_head_dim": 16, "mamba_d_state": 16},
    )
