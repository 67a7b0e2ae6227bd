"""Writes `docs/config.md`, the configuration reference, from the pydantic models' field descriptions.

    python docs/config_reference.py           # (re)write docs/config.md
    python docs/config_reference.py --check   # exit 1 if docs/config.md is not what this script writes

Documented: the search config (`search.config.SearchConfig`, with its space, constraints, strategy options and
the workers' proxy / latency / data settings), the REST submission (`api.schemas.SearchCreate`) and schedule
(`api.schedule_schemas.ScheduleCreate`) bodies, the `hybridnas proxy train --config` file, and every
`HYBRIDNAS_*` environment variable (`api.settings.Settings`, `api.auth.AuthSettings`, the client's). One table
per model, its fields in declaration order (a nested model is a section of its own, linked from its field):
dotted name, type, default, bounds or allowed values (from the `Field` constraints and `Literal` choices) and
the field's description. A field without a description is an error (exit 2, naming it), so the reference can
never silently show a blank. The output is deterministic: no timestamps, the models' own order.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python docs/config_reference.py` puts docs/ first, not the repository
    sys.path.insert(0, str(ROOT))

import annotated_types  # noqa: E402
from pydantic import AliasChoices, BaseModel, SecretStr, TypeAdapter  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

OUTPUT = ROOT / "docs" / "config.md"
COMMAND = "python docs/config_reference.py"


class MissingDescription(ValueError):
    """A documented field has no `description=`."""


# --- formatting ---------------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell (one line; `|` escaped, also inside code spans)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def code(text: str) -> str:
    return f"`{text}`"


def number(value: int | float) -> str:
    """A bound for people: 2^17, 2^32 - 1, 10^13, 100,000, 0.95."""
    if isinstance(value, float):
        if not value.is_integer():
            return repr(value)
        value = int(value)
    n = abs(value)
    sign = "-" if value < 0 else ""
    if n >= 1 << 16:
        if n & (n - 1) == 0:
            return f"{sign}2^{n.bit_length() - 1}"
        if (n + 1) & n == 0:
            return f"{sign}2^{n.bit_length()} - 1"
    if n >= 10**6 and str(n).rstrip("0") == "1":
        return f"{sign}10^{len(str(n)) - 1}"
    return f"{value:,}"


def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _union_members(annotation: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return None


def _non_null(annotation: Any) -> Any:
    """The annotation without `None` (and without Annotated), for an optional field's base type."""
    annotation = _strip_annotated(annotation)
    members = _union_members(annotation)
    if members:
        rest = [m for m in members if m is not type(None)]
        if len(rest) == 1:
            return _strip_annotated(rest[0])
    return annotation


def is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


SIMPLE_TYPES = {int: "int", float: "float", str: "str", bool: "bool", Path: "path", SecretStr: "str (secret)"}


def type_name(annotation: Any, link: Callable[[type[BaseModel]], str | None] = lambda m: None) -> str:
    """The field's type as a reader writes it: int, float | null, list[str], [int, int], dict[str, any]."""
    annotation = _strip_annotated(annotation)
    members = _union_members(annotation)
    if members:
        return " | ".join(type_name(m, link) for m in members)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if annotation in SIMPLE_TYPES:
        return SIMPLE_TYPES[annotation]
    if is_model(annotation):
        return link(annotation) or "object"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        kinds = sorted({type_name(type(a)) for a in args})
        return " | ".join(kinds)
    if origin in (list, set, frozenset, tuple) and (origin is not tuple or args[-1:] == (Ellipsis,)):
        return f"list[{type_name(args[0], link)}]" if args else "list"
    if origin is tuple:
        return "[" + ", ".join(type_name(a, link) for a in args) + "]"
    if origin is dict:
        return f"dict[{type_name(args[0], link)}, {type_name(args[1], link)}]" if args else "dict"
    raise TypeError(f"no type name for {annotation!r}")


def _literal_choices(annotation: Any) -> list[Any]:
    annotation = _strip_annotated(annotation)
    choices: list[Any] = []
    for member in _union_members(annotation) or (annotation,):
        member = _strip_annotated(member)
        if typing.get_origin(member) is typing.Literal:
            choices += typing.get_args(member)
    return choices


def _is_text(annotation: Any) -> bool:
    return _non_null(annotation) in (str, SecretStr, Path)


def bounds(field: FieldInfo, extra: str | None = None) -> str:
    """The field's constraints: 1 ≤ x ≤ 8, one of `a`, `b`, at most 200 characters, matches `^...$`."""
    lower = upper = None
    min_len = max_len = None
    pattern = None
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            lower = f"{number(item.ge)} ≤"
        elif isinstance(item, annotated_types.Gt):
            lower = f"{number(item.gt)} <"
        elif isinstance(item, annotated_types.Le):
            upper = f"≤ {number(item.le)}"
        elif isinstance(item, annotated_types.Lt):
            upper = f"< {number(item.lt)}"
        elif isinstance(item, annotated_types.MinLen):
            min_len = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            max_len = item.max_length
        elif getattr(item, "pattern", None) is not None:
            pattern = item.pattern
    parts = []
    if lower or upper:
        parts.append(" ".join(p for p in (lower, "x", upper) if p))
    choices = _literal_choices(field.annotation)
    if choices:
        parts.append(
            ("only " if len(choices) == 1 else "one of ") + ", ".join(code(json.dumps(c)) for c in choices)
        )
    if min_len is not None or max_len is not None:
        unit = "characters" if _is_text(field.annotation) else "items"
        if min_len is not None and max_len is not None:
            parts.append(f"{min_len} to {max_len} {unit}")
        elif max_len is not None:
            parts.append(f"at most {max_len} {unit}")
        else:
            parts.append(f"at least {min_len} {unit}")
    if pattern is not None:
        parts.append(f"matches {code(pattern)}")
    if extra:
        parts.append(extra)
    return "; ".join(parts) or "-"


def _jsonable(field: FieldInfo, value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "**********"
    try:
        return TypeAdapter(field.annotation).dump_python(value, mode="json")
    except Exception:  # an annotation the adapter cannot build: the value as pydantic would dump it
        return TypeAdapter(type(value)).dump_python(value, mode="json")


def default_value(field: FieldInfo) -> Any:
    """The field's default (a default_factory called), or PydanticUndefined for a required field."""
    if field.default_factory is not None:
        return field.default_factory()
    return field.default


def default_text(field: FieldInfo, env: bool = False) -> str:
    value = default_value(field)
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        changed = changed_fields(type(value)(), value)
        if not changed:
            return "the defaults below"
        return "the defaults below, but " + ", ".join(
            code(f"{name}: {json.dumps(new)}") for name, (_, new) in changed.items()
        )
    data = _jsonable(field, value)
    if env:
        if data is None:
            return "unset"
        if isinstance(data, str):
            return code(data)
    return code(json.dumps(data))


def changed_fields(base: BaseModel, other: BaseModel) -> dict[str, tuple[Any, Any]]:
    """Fields whose value differs between two instances of one model: name -> (base's, other's), as JSON."""
    left, right = base.model_dump(mode="json"), other.model_dump(mode="json")
    return {name: (left[name], right[name]) for name in left if left[name] != right[name]}


def description(model: type[BaseModel], name: str, field: FieldInfo) -> str:
    text = (field.description or "").strip()
    if not text:
        raise MissingDescription(
            f"{model.__module__}.{model.__qualname__}.{name} has no description: add `description=` to its "
            f"Field (a short phrase: what it is, and its unit), then run `{COMMAND}`"
        )
    return text


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


# --- the document -------------------------------------------------------------------------------------------


@dataclass
class Section:
    """A nested model's own section: where its fields are documented, and under which dotted prefix."""

    model: type[BaseModel]
    prefix: str
    heading: str


def _allowed_values() -> dict[tuple[type[BaseModel], str], str]:
    """Choices that validators check rather than the annotation (read from the code that checks them)."""
    from api.settings import Settings
    from search.config import OBJECTIVES, SearchConfig, SpaceSettings
    from search.logs import FORMATS, LEVELS
    from search.operators import OPERATORS
    from search.strategies import STRATEGIES

    def one_of(values: Iterable[str], what: str = "one of") -> str:
        return f"{what} " + ", ".join(code(json.dumps(v)) for v in values)

    mixers = [name for name, spec in OPERATORS.items() if spec.kind == "mixer"]
    return {
        (SearchConfig, "strategy"): one_of(STRATEGIES),
        (SearchConfig, "objectives"): one_of(OBJECTIVES, "two different of"),
        (SearchConfig, "hypervolume_bounds"): "keys: exactly the two `objectives`; finite lower < upper",
        (SpaceSettings, "mixers"): one_of(mixers, "each one of"),
        (Settings, "log_level"): one_of(LEVELS),
        (Settings, "log_format"): one_of(FORMATS),
    }


class Reference:
    def __init__(self) -> None:
        self.allowed = _allowed_values()
        self.lines: list[str] = []

    def out(self, *lines: str) -> None:
        self.lines.extend(lines)

    def heading(self, level: int, text: str) -> str:
        self.out(f"{'#' * level} {text}", "")
        return f"#{slug(text)}"

    def model_table(
        self,
        model: type[BaseModel],
        prefix: str = "",
        links: dict[type[BaseModel], str] | None = None,
        parent_default: BaseModel | None = None,
        only: Iterable[str] | None = None,
        field_links: dict[str, str] | None = None,
    ) -> None:
        """One row per field: `prefix.name`, type, default, bounds, description. `parent_default`: the value
        the enclosing config gives this model by default, where it differs from the model's own defaults."""
        links = links or {}
        changed = changed_fields(model(), parent_default) if parent_default is not None else {}
        rows = []
        for name, field in model.model_fields.items():
            if only is not None and name not in only:
                continue
            text = description(model, name, field)
            target = _non_null(field.annotation)
            anchor = links.get(target) if is_model(target) else (field_links or {}).get(name)
            if anchor:
                text += f" ([`{prefix}{name}.*`]({anchor}))"
            default = default_text(field)
            if name in changed:
                default += f" (a search: {code(json.dumps(changed[name][1]))})"
            rows.append(
                [
                    code(prefix + name),
                    code(type_name(field.annotation, lambda m: m.__name__)),
                    default,
                    bounds(field, self.allowed.get((model, name))),
                    text,
                ]
            )
        self.out(*table(["Field", "Type", "Default", "Allowed", "Description"], rows), "")

    def settings_table(self, model: type[BaseModel]) -> None:
        prefix = model.model_config.get("env_prefix", "")
        rows = []
        for name, field in model.model_fields.items():
            rows.append(
                [
                    ", ".join(code(v) for v in env_names(prefix, name, field)),
                    code(name),
                    code(type_name(field.annotation)),
                    default_text(field, env=True),
                    bounds(field, self.allowed.get((model, name))),
                    description(model, name, field),
                ]
            )
        self.out(*table(["Variable", "Setting", "Type", "Default", "Allowed", "Description"], rows), "")


def env_names(prefix: str, name: str, field: FieldInfo) -> list[str]:
    """The environment variables a setting reads: its alias(es), else PREFIX + NAME (case-insensitive)."""
    alias = field.validation_alias or field.alias
    if isinstance(alias, str):
        return [alias.upper()]
    if isinstance(alias, AliasChoices):
        return [choice.upper() for choice in alias.choices if isinstance(choice, str)]
    return [f"{prefix}{name}".upper()]


def _checked_yaml(model: type[BaseModel], text: str) -> str:
    """An example, validated by the model it illustrates (so the reference never shows a refused one)."""
    import yaml

    data = yaml.safe_load(text)
    model.model_validate(data)
    return text.strip()


def _studies(ref: Reference, heading: str, search_heading: str, links: dict) -> None:
    """One table per study kind: its own fields; the evaluation and execution fields it shares with a search
    link to the search config's."""
    from search.config import SearchConfig
    from search.studies import STUDIES

    ref.heading(2, heading)
    ref.out(
        "A study is a job beside the searches: the body of `POST /api/studies` (with `kind` and an optional "
        "`priority`, as for a search), or a file for `hybridnas study KIND FILE` (YAML or JSON, `kind` "
        "implied). Its runs are grid searches through the same executor and result store. Unknown fields are "
        "refused, and an error names the field.",
        "",
    )
    for kind, model in STUDIES.items():
        ref.heading(3, f"`{kind}` ({model.__name__})")
        ref.out(" ".join((model.__doc__ or "").split()), "")
        shared = [n for n in model.model_fields if n in SearchConfig.model_fields and n != "name"]
        if shared:
            ref.out(
                "Also, as in the [search config](#"
                + slug(search_heading)
                + "): "
                + ", ".join(code(n) for n in shared)
                + ".",
                "",
            )
        ref.model_table(model, only=[n for n in model.model_fields if n not in shared], links=links)


def _tune(ref: Reference, heading: str) -> None:
    from search.tune_config import DEFAULT_STEPS_FACTOR, TuneSpec

    ref.heading(2, heading)
    ref.out(
        "The body of `POST /api/tunes` (`hybridnas tune CANDIDATE_ID` takes the main ones as options: "
        "`--steps`, `--trials`, "
        "`--grace-steps`, `--reduction-factor`, `--lr-range LOW,HIGH`, `--warmup-range LOW,HIGH`, "
        "`--batch-size`, `--seed`): "
        "Ray Tune's ASHA over a candidate's training recipe (lr, warmup_steps, weight_norm, batch_size), "
        "each trial trained from the candidate's proxy weights with the search's data for `steps` optimizer "
        f"steps (default {DEFAULT_STEPS_FACTOR}x the search's proxy steps), any batch size (a larger batch "
        "sees more tokens). Unknown fields are refused; an unknown candidate, one without a completed "
        "training, and ranges out of bounds are a 422 naming the field.",
        "",
    )
    ref.model_table(TuneSpec, "")


def render() -> str:
    """The reference's Markdown text."""
    from api.auth import AuthSettings
    from api.cli_proxy import SECTIONS
    from api.schedule_schemas import ScheduleCreate
    from api.schemas import SearchCreate
    from api.serve import WORKER_SETTINGS_ENV
    from api.settings import Settings
    from hybridnas.client import DEFAULT_URL, TOKEN_ENV, URL_ENV
    from search.config import SearchConfig
    from search.strategies.options import STRATEGY_OPTIONS

    ref = Reference()
    nested = [  # SearchConfig's sub-models, each a section, in the config's field order
        Section(_non_null(f.annotation), f"{name}.", f"`{name}` ({_non_null(f.annotation).__name__})")
        for name, f in SearchConfig.model_fields.items()
        if is_model(_non_null(f.annotation))
    ]
    links = {s.model: f"#{slug(s.heading)}" for s in nested}
    options_heading = "`strategy_options` (per strategy)"
    env_heading = "Environment variables"
    proxy_heading = "`hybridnas proxy train --config FILE`"
    search_heading = "Search config (SearchConfig)"
    create_heading = "Submitting a search: POST /api/searches (SearchCreate)"
    schedule_heading = "Schedules: POST /api/schedules (ScheduleCreate)"
    studies_heading = "Studies: POST /api/studies and hybridnas study KIND FILE"
    tune_heading = "Tuning a recipe: POST /api/tunes and hybridnas tune (TuneSpec)"

    ref.out(
        "# Configuration reference",
        "",
        f"> Generated by `{COMMAND}` from the pydantic models' field descriptions: do not edit this file "
        "by hand. To change it, edit the field's `description=` (or the script), then run "
        f"`{COMMAND}`; `tests/test_docs.py` fails while this file is out of date.",
        "",
        "Contents:",
        "",
        f"- [Search config](#{slug(search_heading)}): the search config "
        "(`search.config.SearchConfig`) and its sections:",
    )
    for section in nested:
        ref.out(f"  - [`{section.prefix}*`](#{slug(section.heading)}) ({section.model.__name__})")
        if section.prefix == "space.":
            ref.out(f"  - [`strategy_options.*`](#{slug(options_heading)}) (one model per strategy)")
    ref.out(
        f"- [Submitting a search](#{slug(create_heading)}) (`api.schemas.SearchCreate`: adds `priority`)",
        f"- [Schedules](#{slug(schedule_heading)}) (`api.schedule_schemas.ScheduleCreate`)",
        f"- [Studies](#{slug(studies_heading)}): fidelity, depth-width, ablation and verdict "
        "(`search.studies`)",
        f"- [Tuning a recipe](#{slug(tune_heading)}) (`search.tune_config.TuneSpec`)",
        f"- [{proxy_heading}](#{slug(proxy_heading)}): the `proxy`, `latency` and `data` sections alone",
        f"- [{env_heading}](#{slug(env_heading)}): every `HYBRIDNAS_*` variable",
        "",
        "Types: `int`, `float`, `bool` and `str` as in JSON/YAML; `null` where a field may be left unset; "
        "`[int, int]` is a pair (a two-item list); `x` in *Allowed* is the value. *Default* is what an "
        "omitted field takes.",
        "",
    )

    # --- the search config ---
    ref.heading(2, search_heading)
    example = _checked_yaml(
        SearchConfig,
        """
name: small-cpu-search
space: {preset: cpu, widths: [64, 96]}
strategy: pareto-aging
strategy_options: {population_size: 8, sample_size: 4}
objectives: [val_bpb, decode_ms]
budget: 32
constraints: {max_decode_ms: 5.0}
proxy: {steps: 200, lr: 0.003}
latency: {repeats: 5}
data: {corpus: stdlib, tokenizer: bytes}
executor: inline
workers: 2
""",
    )
    ref.out(
        "What a search runs: the body of `POST /api/searches`, a file for `hybridnas search run FILE` "
        "(YAML or JSON), the dashboard's form and a schedule's `template` all take this config. Every field "
        "is optional; unknown fields are refused, and an error names the field by its dotted path "
        "(`proxy.lr`). `GET /api/schema/search-config` serves its JSON Schema (for editors). In "
        "`strategy_options`, `constraints`, `proxy`, `latency` and `data` values are strict: an integer must "
        'be an integer and a number a finite number (a string such as `"0.1"` is refused).',
        "",
        "```yaml",
        example,
        "```",
        "",
    )
    ref.model_table(SearchConfig, links=links, field_links={"strategy_options": f"#{slug(options_heading)}"})
    for section in nested:
        ref.heading(3, section.heading)
        model_doc = (section.model.__doc__ or "").strip()
        if model_doc:
            ref.out(" ".join(model_doc.split()), "")
        field = SearchConfig.model_fields[section.prefix[:-1]]
        parent_default = default_value(field)
        differs = isinstance(parent_default, BaseModel) and changed_fields(section.model(), parent_default)
        if differs:
            ref.out(
                f"The *Default* column holds {section.model.__name__}'s own defaults (those of "
                f"[`proxy train`](#{slug(proxy_heading)})); a search's differ where noted.",
                "",
            )
        ref.model_table(section.model, section.prefix, parent_default=parent_default if differs else None)
        if section.prefix == "space.":
            _strategy_options(ref, options_heading, STRATEGY_OPTIONS)

    # --- REST submission and schedules ---
    ref.heading(2, create_heading)
    added = [name for name in SearchCreate.model_fields if name not in SearchConfig.model_fields]
    ref.out(
        f"The body of `POST /api/searches`: the [search config](#{slug(search_heading)}) plus "
        + ", ".join(code(name) for name in added)
        + " (`hybridnas.Client.submit(config, priority=N)` sets it).",
        "",
    )
    ref.model_table(SearchCreate, only=added)

    ref.heading(2, schedule_heading)
    ref.out(
        "The body of `POST /api/schedules`: a cron expression, its time zone, and the search each due "
        f"time submits. `template` is a [search submission](#{slug(create_heading)}) without its own "
        "`priority` (the schedule's `priority` is each run's). Unknown fields are refused.",
        "",
    )
    ref.model_table(ScheduleCreate, "", links={SearchCreate: f"#{slug(create_heading)}"})

    _studies(ref, studies_heading, search_heading, links)
    _tune(ref, tune_heading)

    # --- proxy train --config ---
    ref.heading(2, proxy_heading)
    models = {name: _non_null(SearchConfig.model_fields[name].annotation) for name in SECTIONS}
    section_links = ", ".join(
        f"[`{name}`](#{slug(next(s.heading for s in nested if s.model is models[name]))}) "
        f"({models[name].__name__})"
        for name in SECTIONS
    )
    examples = {"proxy": "{steps: 300, batch_size: 16, lr: 0.002}", "latency": "{repeats: 3}", "data": "{}"}
    proxy_example = "\n".join(
        f"{name}: {_checked_yaml(models[name], examples.get(name, '{}'))}" for name in SECTIONS
    )
    ref.out(
        "`hybridnas proxy train LAYOUT --config FILE` trains and measures one layout. FILE is JSON, or YAML "
        "when it ends in `.yaml` or `.yml`, and holds a mapping with the optional sections "
        + ", ".join(code(s) for s in SECTIONS)
        + ": the same models, fields, bounds and descriptions as the search config's sections of those "
        f"names: {section_links}. An unknown section or field is refused (exit 2, naming `section.field`). "
        "`--steps`, `--corpus` and `--tokenizer` override `proxy.steps`, `data.corpus` and `data.tokenizer`. "
        "An omitted field takes the model's own default (the *Default* column), not a search's.",
        "",
        "```yaml",
        proxy_example,
        "```",
        "",
    )

    # --- environment ---
    ref.heading(2, env_heading)
    ref.out(
        "The coordinator (`hybridnas serve`) and the CLI read the service and authentication settings from "
        "the environment, else from a `.env` file in the working directory. A list is JSON "
        '(`HYBRIDNAS_DATA_ROOTS=\'["/data", "."]\'`), a boolean `true`/`false` (or `1`/`0`). A bad value is '
        "refused at start, naming the variable.",
        "",
    )
    ref.heading(3, "Service settings (api.settings.Settings)")
    ref.settings_table(Settings)
    ref.heading(3, "Authentication (api.auth.AuthSettings)")
    ref.settings_table(AuthSettings)
    ref.heading(3, "Client (hybridnas.Client and the CLI)")
    ref.out(
        "Read by the Python client and the CLI's `search` commands (not pydantic settings):",
        "",
        *table(
            ["Variable", "Default", "Description"],
            [
                [
                    code(URL_ENV),
                    code(DEFAULT_URL) + " (client); unset: the CLI works on the local database",
                    "the coordinator `hybridnas.Client()` talks to, and the default of the CLI's `--url` "
                    "(`hybridnas search list --url ...`)",
                ],
                [
                    code(TOKEN_ENV),
                    "the token file of this machine's data dir (`<data_dir>/token`)",
                    "the bearer token the client sends (the same variable sets the coordinator's token)",
                ],
            ],
        ),
        "",
    )
    ref.heading(3, "Internal and test variables")
    ref.out(
        *table(
            ["Variable", "Description"],
            [
                [
                    code(WORKER_SETTINGS_ENV),
                    "set by `hybridnas serve` for its API worker processes (`HYBRIDNAS_API_WORKERS` > 1): "
                    "the supervisor's settings as JSON; not for users",
                ],
                [
                    code("HYBRIDNAS_TEST_POSTGRES_URL"),
                    "tests and benchmarks: a PostgreSQL admin URL that may create databases; unset, the "
                    "PostgreSQL half of the tests is skipped (outside CI)",
                ],
                [
                    code("HYBRIDNAS_SCREENSHOTS"),
                    "tests: the folder the browser tests write page screenshots to (default "
                    "`build/screenshots`)",
                ],
                [
                    code("HYBRIDNAS_CHAOS_RUN"),
                    "tests: the marker the chaos harness puts in the environment of every process of a run",
                ],
                [
                    code("HYBRIDNAS_PORT"),
                    "docker-compose.yml: the host port (on 127.0.0.1) the coordinator's API is published on "
                    "(default 8000; deploy/README.md)",
                ],
            ],
        ),
    )
    return "\n".join(ref.lines).rstrip("\n") + "\n"


def _strategy_options(ref: Reference, heading: str, options: dict[str, type[BaseModel]]) -> None:
    ref.heading(3, heading)
    ref.out(
        "The options of the config's `strategy`; unknown options are refused (the error lists the known "
        "ones). A `null` default means the strategy's own (e.g. the population size it picks for the space).",
        "",
    )
    for name, model in options.items():
        ref.heading(4, f"`{name}` ({model.__name__})")
        ref.model_table(model, "strategy_options.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/config.md from the pydantic models.")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if docs/config.md differs from what would be written"
    )
    args = parser.parse_args(argv)
    try:
        text = render()
    except MissingDescription as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    relative = OUTPUT.relative_to(ROOT)
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else None
        if current != text:
            state = "is missing" if current is None else "is out of date"
            print(f"{relative} {state}: run `{COMMAND}` and commit the result", file=sys.stderr)
            return 1
        print(f"{relative} is up to date")
        return 0
    OUTPUT.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
