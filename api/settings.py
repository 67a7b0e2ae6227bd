"""Settings in one place (environment variables `HYBRIDNAS_*`, or a `.env` file)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HYBRIDNAS_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path(".hybridnas"), description="token cache, artifacts, locks, the SQLite database")
    database_url: str | None = Field(None, description="default: SQLite under the data dir; production: "
                                                       "postgresql+psycopg://user:pass@host/db")
    data_roots: list[Path] = Field(default_factory=lambda: [Path(".")],
                                   description="corpus paths must resolve inside one of these")

    def resolved_data_dir(self) -> Path:
        path = self.data_dir.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def resolved_database_url(self) -> str:
        import os
        return self.database_url or os.environ.get("DATABASE_URL") or f"sqlite:///{self.resolved_data_dir() / 'hybridnas.db'}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
