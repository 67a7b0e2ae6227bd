"""Studies beside the search: job kinds whose runs are grid searches (`search/strategies/grid.py`) through the
same engine, executor and result store, analysed into a report stored with the study.

A study plans its runs (`plan`: one `StudyRun` each, a grid of layouts with its proxy settings); the runner
(`search/study_runner.py`) executes each as a job of kind `study-run` under the study (resumable: a finished
run is never run again, and results are shared through their keys with every search), and `analyse` turns
the runs' candidates into the report. Torch-free: the numbers come from the stored results.

Kinds (one module each): `depth-width` (the scaling law, method.md section 2), `fidelity` (does the short
proxy rank layouts as a longer training does), `ablation` (weight normalization and meta tokens, section 5)
and `verdict` (the searched hybrid against the best plain Transformer at equal latency).
"""

from __future__ import annotations

from typing import Any

from search.studies.ablation import AblationStudy
from search.studies.base import Reference, RunSettings, Study, StudyError, StudyRun
from search.studies.depth_width import DepthWidthStudy
from search.studies.fidelity import FidelityStudy
from search.studies.verdict import VerdictStudy

STUDIES: dict[str, type[Study]] = {
    "depth-width": DepthWidthStudy,
    "fidelity": FidelityStudy,
    "ablation": AblationStudy,
    "verdict": VerdictStudy,
}

__all__ = [
    "STUDIES",
    "AblationStudy",
    "DepthWidthStudy",
    "FidelityStudy",
    "Reference",
    "RunSettings",
    "Study",
    "StudyError",
    "StudyRun",
    "VerdictStudy",
    "parse_study",
]


def parse_study(config: dict[str, Any]) -> Study:
    """The study config of its kind (pydantic's ValidationError names the field)."""
    kind = config.get("kind")
    model = STUDIES.get(kind)
    if model is None:
        raise ValueError(f"kind: unknown study kind {kind!r} (known: {', '.join(STUDIES)})")
    return model.model_validate(config)
