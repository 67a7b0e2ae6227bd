"""hybridnas: search for latency-optimal hybrid small language models.

The public Python API; user code imports only this package.

    import hybridnas

    client = hybridnas.Client()                    # a coordinator (`hybridnas serve`) over REST
    search = client.wait(client.submit("search.yaml").id)

    result = hybridnas.run_search("search.yaml")   # or in this process, no server
    result.front, result.to_dataframe()
"""

from importlib.metadata import PackageNotFoundError, version

from api.schedule_schemas import FireOut, ScheduleOut
from api.schemas import (
    CandidateDetail,
    CandidateSummary,
    ParetoOut,
    SearchCreated,
    SearchDetail,
    SearchOut,
    StudyDetail,
    StudyOut,
)
from hybridnas.client import Client
from hybridnas.config import load_config, validate_search_config
from hybridnas.errors import ApiError, ConfigError, FieldError, HybridnasError
from hybridnas.frames import to_dataframe
from hybridnas.local import SearchResult, run_search
from search.config import SearchConfig
from search.evaluation import DataConfig, LatencyConfig, ProxyConfig
from search.layout import Layout, load_layout
from search.presets import get_preset, preset_names

try:
    __version__ = version("hybridnas")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "ApiError",
    "CandidateDetail",
    "CandidateSummary",
    "Client",
    "ConfigError",
    "DataConfig",
    "FieldError",
    "FireOut",
    "HybridnasError",
    "LatencyConfig",
    "Layout",
    "ParetoOut",
    "ProxyConfig",
    "ScheduleOut",
    "SearchConfig",
    "SearchCreated",
    "SearchDetail",
    "SearchOut",
    "SearchResult",
    "StudyDetail",
    "StudyOut",
    "__version__",
    "get_preset",
    "load_config",
    "load_layout",
    "preset_names",
    "run_search",
    "to_dataframe",
    "validate_search_config",
]
