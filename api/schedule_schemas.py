"""Request and response bodies of /api/schedules (pydantic), kept apart from the storage records."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.schemas import SearchCreate
from search.storage import ScheduleFireRecord, ScheduleRecord, check_cron, check_timezone

NAME_MAX = 200
CRON_MAX = 200
TIMEZONE_MAX = 64
PRIORITY_LIMIT = 1000

_CRON_DOC = (
    "5-field cron (minute hour day-of-month month day-of-week) or @hourly/@daily/@weekly/@monthly/"
    "@yearly, matched against local wall-clock time in `timezone`"
)
_TZ_DOC = (
    "IANA time zone (zoneinfo), e.g. Europe/Berlin. DST: a wall time skipped when clocks spring forward "
    "fires once when they jump; one that happens twice when they fall back fires once, the first time"
)


def _cron(value: str) -> str:
    return check_cron(value)


def _timezone(value: str) -> str:
    return check_timezone(value)


def _no_template_priority(template: SearchCreate | None) -> None:
    if template is not None and "priority" in template.model_fields_set:
        raise ValueError(
            "template.priority: a scheduled search runs at the schedule's priority; set `priority` "
            "on the schedule, not in its template"
        )


SCHEDULE_EXAMPLES: dict[str, dict[str, Any]] = {
    "nightly": {
        "summary": "A small search every night at 02:00 Berlin time",
        "value": {
            "name": "nightly-cpu",
            "cron": "0 2 * * *",
            "timezone": "Europe/Berlin",
            "template": {"name": "nightly-cpu", "budget": 24, "proxy": {"steps": 40}},
            "priority": 1,
        },
    },
    "weekly-warm": {
        "summary": "Weekly, each run starting from the previous run's Pareto front",
        "value": {
            "name": "weekly-warm",
            "cron": "@weekly",
            "template": {"budget": 32, "strategy": "pareto-aging"},
            "warm_start": True,
            "enabled": False,
        },
    },
}


def template_json(template: SearchCreate) -> dict[str, Any]:
    """What is stored: the fields the user set (validated again at every fire, so defaults follow the
    code)."""
    return template.model_dump(mode="json", exclude_unset=True)


class ScheduleCreate(BaseModel):
    """A new schedule: a cron expression, its time zone, and the search each due time submits."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [e["value"] for e in SCHEDULE_EXAMPLES.values()]}
    )

    name: str = Field(min_length=1, max_length=NAME_MAX, description="a name for people (need not be unique)")
    cron: str = Field(min_length=1, max_length=CRON_MAX, description=_CRON_DOC, examples=["0 2 * * *"])
    timezone: str = Field("UTC", min_length=1, max_length=TIMEZONE_MAX, description=_TZ_DOC)
    template: SearchCreate = Field(description="the search each due time submits (as POST /api/searches)")
    enabled: bool = Field(True, description="false: stored, but nothing fires until it is enabled")
    warm_start: bool = Field(
        False,
        description="start each run from the Pareto front of the schedule's latest "
        "completed run (the first run starts cold)",
    )
    priority: int = Field(0, ge=-PRIORITY_LIMIT, le=PRIORITY_LIMIT, description="queue priority of each run")

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str) -> str:
        return _cron(value)

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        return _timezone(value)

    @model_validator(mode="after")
    def _template(self) -> ScheduleCreate:
        _no_template_priority(self.template)
        return self


class SchedulePatch(BaseModel):
    """A partial update: only the fields sent change (null is refused). Changing cron or timezone, or enabling
    a disabled schedule, starts its due times from now (nothing is recorded for the time before)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=NAME_MAX, description="a new name")
    cron: str | None = Field(None, min_length=1, max_length=CRON_MAX, description=_CRON_DOC)
    timezone: str | None = Field(None, min_length=1, max_length=TIMEZONE_MAX, description=_TZ_DOC)
    template: SearchCreate | None = Field(None, description="a new template: replaces the whole template")
    enabled: bool | None = Field(None, description="enable (due times start from now) or disable it")
    warm_start: bool | None = Field(None, description="start each run from the latest completed run's front")
    priority: int | None = Field(
        None, ge=-PRIORITY_LIMIT, le=PRIORITY_LIMIT, description="queue priority of each later run"
    )

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str | None) -> str | None:
        return None if value is None else _cron(value)

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str | None) -> str | None:
        return None if value is None else _timezone(value)

    @model_validator(mode="after")
    def _not_null(self) -> SchedulePatch:
        for name in sorted(self.model_fields_set):
            if getattr(self, name) is None:
                raise ValueError(f"{name}: may not be null (leave it out to keep it)")
        _no_template_priority(self.template)
        return self

    def changes(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.model_fields_set}
        if "template" in out:
            out["template"] = template_json(self.template)
        return out


class ScheduleOut(BaseModel):
    """A schedule, with its next due time."""

    id: int = Field(description="the schedule's id")
    name: str = Field(description="its name")
    cron: str = Field(description=_CRON_DOC)
    timezone: str = Field(description="the IANA time zone `cron` is matched in")
    template: dict[str, Any] = Field(
        description="the search each due time submits: the fields as given (validated again at each fire, "
        "so defaults follow the server's code)"
    )
    enabled: bool = Field(description="whether due times fire")
    warm_start: bool = Field(description="each run starts from the latest completed run's Pareto front")
    priority: int = Field(description="queue priority of each run")
    created_at: datetime = Field(description="when it was created (UTC)")
    updated_at: datetime = Field(description="when it was last changed (UTC)")
    last_due_at: datetime | None = Field(description="the cursor: due times up to here are done")
    next_due_at: datetime | None = Field(None, description="the next due time, UTC (null when disabled)")
    next_due_local: datetime | None = Field(None, description="the same instant in the schedule's time zone")

    @classmethod
    def of(
        cls, schedule: ScheduleRecord, next_due: datetime | None, next_local: datetime | None
    ) -> ScheduleOut:
        return cls(
            **{name: getattr(schedule, name) for name in cls.model_fields if hasattr(schedule, name)},
            next_due_at=next_due,
            next_due_local=next_local,
        )


class FireOut(BaseModel):
    """One due time of a schedule, and what the scheduler did with it."""

    id: int = Field(description="the record's id")
    schedule_id: int = Field(description="the schedule")
    due_at: datetime = Field(description="the due time, UTC")
    due_local: datetime = Field(description="the due time in the schedule's time zone")
    fired_at: datetime = Field(description="when a scheduler recorded it")
    status: str = Field(description="fired, missed, skipped or failed")
    job_id: int | None = Field(description="the search it queued (fired only)")
    reason: str | None = Field(description="why it was missed, skipped or failed (or a note on a fire)")

    @classmethod
    def of(cls, fire: ScheduleFireRecord, due_local: datetime) -> FireOut:
        return cls(
            **{name: getattr(fire, name) for name in cls.model_fields if hasattr(fire, name)},
            due_local=due_local,
        )
