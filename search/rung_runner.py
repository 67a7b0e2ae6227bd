"""A multi-fidelity search's rungs inside the engine: promotions begun, run on the executor, and recorded.

The engine trains every new candidate at the lowest rung as usual (its payload carries rung 0's settings);
`RungRunner` records that result as the candidate's rung-0 run, and then keeps the workers busy with
promotions before new candidates: whenever a candidate qualifies (`search.multifidelity.RungLadder`, built
from the database's rung runs) its next rung's run is begun (one `INSERT` per candidate and rung, so never
twice) and submitted under the task id `-run_id` (candidates use their positive ids). A promotion reuses a
stored training result under its rung's key; else it trains, continuing from the lower rung's stable-phase
checkpoint (`continue_from`) unless the config says fresh, and never measures latency again. Its result
replaces the candidate's values (`candidates.rung`), the strategy is told by `update`, and a result at the
top rung enters the front and the hypervolume, which count top-rung results only.

Crash safety: a run in flight at a stop is `running` in the database and goes back to `pending` when the
search resumes (`requeue`), then runs again; a result is stored under its key before its run is completed,
and `reconcile` tells the strategy of runs completed just before a stop.
"""

from __future__ import annotations

import json
import logging

from search.evaluation import EvaluationResult, ProxyConfig, ResultKeys
from search.multifidelity import FidelityConfig, RungLadder

log = logging.getLogger("hybridnas.engine")

DONE = ("completed", "reused")


def task_id_of(run_id: int) -> int:
    return -run_id


def is_rung_task(task_id: int) -> bool:
    return task_id < 0


class RungRunner:
    def __init__(self, engine, fidelity: FidelityConfig):
        self.engine, self.fidelity = engine, fidelity
        self.storage, self.job_id = engine.storage, engine.job_id
        self._ladder: RungLadder | None = None

    # ---- settings ------------------------------------------------------------------------------------------
    def proxy(self, rung: int) -> ProxyConfig:
        return self.fidelity.proxy_at(self.engine.config.proxy, rung)

    @property
    def top(self) -> int:
        return self.fidelity.top

    def at_top(self, candidate) -> bool:
        return candidate.rung == self.top

    # ---- the ladder ----------------------------------------------------------------------------------------
    def ladder(self) -> RungLadder:
        """The rungs' results and runs as the database holds them (cached until a run changes)."""
        if self._ladder is None:
            names = self.engine.config.objectives
            rows = [
                (
                    run.candidate_id,
                    run.rung,
                    tuple(run.objectives[n] for n in names)
                    if run.status in DONE and run.objectives
                    else None,
                )
                for run in self.storage.rung_runs(self.job_id)
            ]
            self._ladder = RungLadder.build(len(self.fidelity.rungs), self.fidelity.eta, rows)
        return self._ladder

    def _changed(self) -> None:
        self._ladder = None

    def has_work(self) -> bool:
        """A rung run waits to be submitted, or a candidate qualifies for its next rung."""
        return bool(self.storage.rung_runs(self.job_id, status="pending") or self.ladder().promotions())

    # ---- the rung-0 result of a candidate ------------------------------------------------------------------
    def first_rung_done(
        self, cand, training_key: str, val_bpb: float, objectives: dict, steps_trained: int, reused: bool
    ) -> None:
        """A candidate's lowest-rung evaluation completed (trained or reused): its rung-0 run, recorded."""
        run_id = self.storage.begin_rung(self.job_id, cand.id, 0, self.fidelity.rungs[0], status="running")
        if run_id is None:  # recorded already (a resume): nothing more to write
            return
        self.storage.complete_rung(run_id, training_key, val_bpb, objectives, steps_trained, reused=reused)
        self.storage.set_candidate_rung(cand.id, 0, training_key, val_bpb, objectives)
        self._changed()

    # ---- promotions on the executor ------------------------------------------------------------------------
    def fill(self, executor, room: int) -> int:
        """Submit waiting rung runs (resumed, retried), then newly qualified promotions, up to `room`; how
        many were submitted."""
        submitted = 0
        for run in self.storage.rung_runs(self.job_id, status="pending")[:room]:
            self._submit(executor, run.id, run.candidate_id, run.rung)
            submitted += 1
        for candidate_id, rung in self.ladder().promotions():
            if submitted >= room:
                break
            run_id = self.storage.begin_rung(self.job_id, candidate_id, rung, self.fidelity.rungs[rung])
            self._changed()
            if run_id is None:
                continue
            log.info("job %d: candidate %d promoted to rung %d", self.job_id, candidate_id, rung)
            self._submit(executor, run_id, candidate_id, rung)
            submitted += 1
        return submitted

    def _submit(self, executor, run_id: int, candidate_id: int, rung: int) -> None:
        self.storage.mark_rung_running(run_id)
        self._changed()
        executor.submit(task_id_of(run_id), self._payload(candidate_id, rung))

    def _payload(self, candidate_id: int, rung: int) -> dict:
        config = self.engine.config
        cand = self.storage.get_candidate(candidate_id)
        return {
            "layout": json.dumps(cand.layout),
            "proxy": self.proxy(rung).model_dump(),
            "latency": config.latency.model_dump(),
            "data": config.data.model_dump(),
        }

    def handle(self, outcome, strategy, executor) -> None:
        run = self.storage.get_rung_run(-outcome.task_id)
        if outcome.keys is not None:
            self._keys_known(run, outcome.keys, strategy, executor)
        elif outcome.result is not None:
            self._evaluated(run, outcome.result, strategy)
        elif outcome.retryable and run.attempts <= self.engine.config.max_retries:
            log.warning("rung run %d: %s; retrying", run.id, outcome.reason)
            self._submit(executor, run.id, run.candidate_id, run.rung)
        else:
            self._failed(run, outcome.reason or "failed (no reason given)", strategy)

    def _keys_known(self, run, keys: ResultKeys, strategy, executor) -> None:
        stored = self.storage.get_training_result(keys.training_key)
        if stored is not None and stored.status == "completed":
            executor.release(task_id_of(run.id))
            self._complete(run, keys.training_key, stored.val_bpb, strategy, steps_trained=0, reused=True)
            return
        payload = {
            **self._payload(run.candidate_id, run.rung),
            "train": True,
            "measure_latency": False,  # measured once, with the candidate's first rung
            "keys": keys.to_dict(),
            "continue_from": self._checkpoint_below(run),
        }
        executor.evaluate(task_id_of(run.id), payload)

    def _checkpoint_below(self, run) -> str | None:
        """The lower rung's stable-phase checkpoint, which this rung's run continues from (None: fresh)."""
        if not self.fidelity.continuation:
            return None
        lower = next(
            (
                r
                for r in self.storage.rung_runs(self.job_id, candidate_id=run.candidate_id)
                if r.rung == run.rung - 1
            ),
            None,
        )
        stored = (
            self.storage.get_training_result(lower.training_key) if lower and lower.training_key else None
        )
        return (stored.result or {}).get("stable_checkpoint") if stored else None

    def _evaluated(self, run, result: EvaluationResult, strategy) -> None:
        self.engine.store_training(result)
        if result.status != "completed":
            self._failed(run, result.failure_reason or "failed (no reason given)", strategy)
            return
        stored = self.storage.get_training_result(result.training_key)
        training = result.training or {}
        self._complete(
            run,
            result.training_key,
            stored.val_bpb,
            strategy,
            steps_trained=int(training.get("steps_trained") or run.steps),
            continued_from_step=training.get("continued_from_step"),
        )

    def _complete(
        self,
        run,
        training_key: str,
        val_bpb: float,
        strategy,
        *,
        steps_trained: int,
        continued_from_step: int | None = None,
        reused: bool = False,
    ) -> None:
        cand = self.storage.get_candidate(run.candidate_id)
        objectives = self.engine.objectives_of(cand, val_bpb)
        self.storage.complete_rung(
            run.id, training_key, val_bpb, objectives, steps_trained, continued_from_step, reused=reused
        )
        self._changed()
        if (cand.rung or 0) < run.rung:
            self.storage.set_candidate_rung(cand.id, run.rung, training_key, val_bpb, objectives)
        strategy.update(cand.layout_hash, objectives, run.rung)
        log.info(
            "job %d: candidate %d at rung %d (%d steps): val_bpb %.4f%s",
            self.job_id,
            cand.id,
            run.rung,
            run.steps,
            val_bpb,
            " (reused)" if reused else f", {steps_trained} steps trained",
        )
        self.engine.after_tell(strategy, completed_id=cand.id if run.rung == self.top else None)

    def _failed(self, run, reason: str, strategy) -> None:
        """A promotion that failed: the candidate keeps its lower rung's values; the search goes on."""
        log.warning(
            "job %d: rung run %d (candidate %d, rung %d) failed: %s",
            self.job_id,
            run.id,
            run.candidate_id,
            run.rung,
            reason,
        )
        self.storage.fail_rung(run.id, reason)
        self._changed()
        self.engine.after_tell(strategy)

    # ---- resume --------------------------------------------------------------------------------------------
    def requeue(self) -> list[int]:
        """Runs in flight at a stop go again."""
        self._changed()
        return self.storage.reset_running_rungs(self.job_id)

    def reconcile(self, strategy) -> bool:
        """After a crash: record the rung-0 run of a candidate completed just before the stop, and tell the
        strategy of promotions completed just before it. Whether anything changed."""
        changed = False
        recorded = {run.candidate_id for run in self.storage.rung_runs(self.job_id) if run.rung == 0}
        for cand in self.storage.candidates(self.job_id, status=DONE):
            if cand.id not in recorded and cand.training_key is not None:
                steps = 0 if cand.status == "reused" else self.fidelity.rungs[0]
                self.first_rung_done(
                    cand,
                    cand.training_key,
                    cand.val_bpb,
                    cand.objectives,
                    steps,
                    reused=cand.status == "reused",
                )
                changed = True
        for run in self.storage.rung_runs(self.job_id, status=DONE):
            cand = self.storage.get_candidate(run.candidate_id)
            record = strategy.records.get(cand.layout_hash)
            if (
                run.rung > 0
                and record
                and record["objectives"]
                and strategy.rung_of(cand.layout_hash) < run.rung
            ):
                if (cand.rung or 0) < run.rung:
                    self.storage.set_candidate_rung(
                        cand.id, run.rung, run.training_key, run.val_bpb, run.objectives
                    )
                strategy.update(cand.layout_hash, run.objectives, run.rung)
                changed = True
        return changed
