"""Search configs from what users hold (a dict, a YAML or JSON file, a `SearchConfig`), and the service's own
checks on them, for every entry point that does not go through the REST API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hybridnas.errors import ConfigError, FieldError
from search.config import SearchConfig


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file holding a mapping."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([FieldError("", f"{path} cannot be read ({exc.strerror})")], str(path)) from None
    try:
        data = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise ConfigError([FieldError("", f"not valid YAML or JSON ({exc})")], str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([FieldError("", "the file must hold a mapping of fields")], str(path))
    return data


def load_config(config: dict | str | Path | SearchConfig) -> dict[str, Any]:
    """The config as a JSON-ready dict (a copy)."""
    if isinstance(config, SearchConfig):
        return json.loads(config.model_dump_json(exclude_defaults=True))
    if isinstance(config, (str, Path)):
        return read_config_file(config)
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    raise TypeError(f"a search config is a dict, a file path or a SearchConfig, not {type(config).__name__}")


def validate_search_config(
    config: dict | str | Path | SearchConfig, data_roots: list | None = None
) -> SearchConfig:
    """The checks of POST /api/searches (the same models, limits and data-roots rule); `ConfigError`
    naming each field otherwise."""
    from pydantic import ValidationError

    from api.errors import validation_errors
    from api.schemas import SearchCreate
    from api.settings import get_settings
    from api.submit import SubmitError, check_data_paths

    source = str(config) if isinstance(config, (str, Path)) else "search config"
    data = load_config(config)
    roots = get_settings().data_roots if data_roots is None else data_roots
    try:
        body = check_data_paths(SearchCreate.model_validate(data), roots)
        return SearchConfig.model_validate(body.search_config())
    except ValidationError as exc:
        errors = [FieldError(e["field"], e["msg"]) for e in validation_errors(list(exc.errors()))]
    except SubmitError as exc:
        errors = [FieldError(exc.field, exc.reason)]
    raise ConfigError(errors, source)
