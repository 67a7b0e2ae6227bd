"""Settings in one place (environment variables `HYBRIDNAS_*`, or a `.env` file).

The auth settings (`HYBRIDNAS_TOKEN`, `HYBRIDNAS_REQUIRE_TOKEN_FOR_READS`) live in `api/auth.py`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from search.logs import check_format, check_level
from search.storage import normalize_database_url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="HYBRIDNAS_", env_file=".env", extra="ignore", populate_by_name=True
    )

    data_dir: Path = Field(Path(".hybridnas"), description="token, artifacts, locks, the SQLite database")
    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("HYBRIDNAS_DATABASE_URL", "DATABASE_URL"),
        description="default: SQLite under the data dir; production: postgresql://user:pass@host/db "
        "(HYBRIDNAS_DATABASE_URL, or DATABASE_URL as hosting platforms set it; postgres:// and postgresql:// "
        "mean psycopg 3)",
    )

    @field_validator("database_url")
    @classmethod
    def _psycopg(cls, value: str | None) -> str | None:
        return None if value is None else normalize_database_url(value)

    data_roots: list[Path] = Field(
        default_factory=lambda: [Path(".")], description="corpus paths must resolve inside one of these"
    )
    # The service's process model (see README: "The coordinator service").
    runners: int = Field(
        1, ge=0, le=64, description="jobs this process runs at once (0: API only, no runners)"
    )
    max_running_jobs: int = Field(
        1, ge=1, le=1024, description="jobs running at once across every coordinator (the global limit)"
    )
    lease_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="seconds a runner's lease on its job lasts; renewed every third of it",
    )
    poll_s: float = Field(1.0, gt=0, le=60, description="seconds between an idle runner's looks at the queue")
    scheduler: bool = Field(True, description="fire scheduled searches from this process")
    scheduler_interval_s: float = Field(
        15.0, gt=0, le=3600, description="seconds between the scheduler's looks for due schedules"
    )
    scheduler_grace_s: float = Field(
        900.0,
        ge=0,
        le=7 * 24 * 3600,
        description="seconds: a fire time missed by at most this much still runs (once)",
    )
    ray_num_cpus: int | None = Field(
        None,
        ge=1,
        description="CPUs of the local Ray the runners start (default: all; ignored with RAY_ADDRESS)",
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="request bodies larger than this are refused (413)"
    )
    max_concurrent_requests: int = Field(
        4,
        ge=1,
        le=10_000,
        description="requests admitted at once (health, readiness and event streams aside); beyond, 503 with "
        "Retry-After at once. Sized to what one process finishes within its latency target "
        "(benchmarks/results/api_sweep.md): a large value lets overload queue into timeouts",
    )
    api_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="processes serving the API (the runner and scheduler run once, beside "
        "them); 2 on a two-core host doubled the read capacity (benchmarks/results/api_sweep.md)",
    )
    request_threads: int = Field(
        2,
        ge=1,
        le=256,
        description="threads that run the (database-bound) route handlers; more only add "
        "contention for the interpreter lock",
    )
    read_cache_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description="GET responses are reused while no write of this process intervened, for "
        "at most this long (the bound on how late another process's writes show); 0: off",
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="log every evaluation to MLflow (the [mlflow] extra): one experiment per search, one run "
        "per candidate; e.g. sqlite:///mlflow.db or http://host:5000",
    )

    log_level: str = Field(
        "info", description="debug, info, warning or error (the CLI's -v / -q change it per command)"
    )
    log_format: str = Field(
        "text", description="text, or json: one JSON object per line (time, level, logger, message)"
    )

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        return check_level(value)

    @field_validator("log_format")
    @classmethod
    def _format(cls, value: str) -> str:
        return check_format(value)

    def resolved_data_dir(self) -> Path:
        """The data dir as an absolute path (nothing is created: see `ensure_data_dir`)."""
        return self.data_dir.expanduser().resolve()

    def ensure_data_dir(self) -> Path:
        """The data dir, made if missing (for commands that write: serve, search run, demo)."""
        path = self.resolved_data_dir()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def resolved_data_roots(self) -> tuple[str, ...]:
        """The data roots as absolute paths (a Ray worker's working folder is not the caller's)."""
        return tuple(str(p.expanduser().resolve()) for p in self.data_roots)

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir() / 'hybridnas.db'}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
