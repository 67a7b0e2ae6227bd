"""The `grid` strategy: a fixed list of layouts, evaluated in the order given, nothing proposed after them.
The studies (depth–width, ablations, fidelity) run their configurations as grid searches, so every point goes
through the same engine, executor and result store as a search (and nothing a search trained is trained
twice)."""

from __future__ import annotations

from search.layout import Layout
from search.strategies.base import Proposal, Strategy


class GridStrategy(Strategy):
    name = "grid"

    def __init__(self, space, layouts=(), **kw):
        kw.pop("initial", None)  # a grid's layouts are its whole population, not a start for mutation
        super().__init__(space, **kw)
        self.queue = [Layout.from_dict(layout).to_dict() for layout in layouts]

    def _propose(self) -> Proposal | None:
        while self.queue:
            layout = Layout.from_dict(self.queue.pop(0))
            if self.seen(layout.content_hash):
                self._note(f"grid layout {layout.name or layout.compact()} given twice: evaluated once")
                continue
            return Proposal(layout, None, None, 0)
        return None

    def _extra_state(self) -> dict:
        return {"queue": list(self.queue)}

    def _load_extra_state(self, state: dict) -> None:
        self.queue = list(state.get("queue", []))
