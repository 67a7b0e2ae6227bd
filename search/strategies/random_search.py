"""`random`: uniform random layouts of the space (as `SearchSpace.sample_uniform` draws them: every genome
equally likely), never one seen before and never one violating a constraint checkable before evaluation. The
floor every strategy must beat."""

from __future__ import annotations

from search.strategies.base import Proposal, Strategy


class RandomStrategy(Strategy):
    name = "random"

    def __init__(self, space, **kw):
        super().__init__(space, **kw)
        self.initial_queue = [layout.to_dict() for layout in self.initial]

    def _propose(self) -> Proposal | None:
        from search.layout import Layout

        while self.initial_queue:  # initial layouts (if any) are proposed first, as given
            layout = Layout.from_dict(self.initial_queue.pop(0))
            if not self.seen(layout.content_hash) and self.feasible(layout):
                return Proposal(layout, None, None, 0)
            self._note(f"initial layout {layout.name or layout.compact()} skipped: known or infeasible")
        layout = self.random_new_layout()
        return None if layout is None else Proposal(layout, None, None, 0)

    def _extra_state(self) -> dict:
        return {"initial_queue": list(self.initial_queue)}

    def _load_extra_state(self, state: dict) -> None:
        self.initial_queue = list(state.get("initial_queue", []))
