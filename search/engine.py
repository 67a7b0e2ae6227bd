"""The search loop: ask the strategy, de-duplicate, evaluate on the executor, tell, store — resumable.

Guarantees (tested by killing the process mid-evaluation): after a restart the search continues from the
database; no result key ever has two completed results (unique keys in storage); an evaluation in flight at
the kill is rerun at most once (its candidate goes back to pending, attempts counted); nothing completed is
lost (every result is committed before the strategy hears of it).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from search.config import SearchConfig
from search.evaluation import EvaluationResult, ResultKeys
from search.executors import Executor, Outcome, WorkersUnavailable
from search.layout import Layout
from search.params import count_parameters
from search.pareto import HypervolumeSpace, pareto_front
from search.presets import get_preset
from search.rung_runner import RungRunner, is_rung_task
from search.storage import DatabaseUnavailable, is_unavailable
from search.strategies import make_strategy

log = logging.getLogger("hybridnas.engine")

# The scaled-down known designs that seed a search (method.md section 4: "known designs plus random ones").
SEED_PRESETS = ("llama", "mamba2", "deltanet", "nemotron-flash-1b-mini")


class StopEvent(threading.Event):
    """The engine's stop signal, saying why: `cancel` (the job was cancelled) or `lost` (another runner owns
    it now: write nothing more); neither means a shutdown (the job goes back to the queue)."""

    cancel = False
    lost = False


@dataclass
class Progress:
    n_evaluations: int
    budget: int
    n_failed: int
    n_reused: int
    hypervolume: float | None
    last: dict | None = None


def initial_layouts(config: SearchConfig, space, storage) -> list[Layout]:
    """Warm start from an earlier search's Pareto front, or the presets re-expressed in this space."""
    if config.warm_start_job is not None:
        front = storage.candidates(config.warm_start_job, status=("completed", "reused"), on_front=True)
        return [Layout.from_dict(c.layout) for c in front]
    if config.initial != "presets":
        return []
    dims = space._dims_for(min(space.widths))
    out = []
    for name in SEED_PRESETS:
        preset = get_preset(name)
        ops = list(preset.operators)
        while len(ops) > space.max_operators:  # keep the pattern, trimmed to the space's operator limit
            ops = ops[: space.max_operators - (space.max_operators % 2)]
        mixers = {op for op in ops if op != "ffn"}
        if not mixers <= set(space.mixers):
            continue
        out.append(Layout.from_dict({"operators": ops, "name": name, **dims}))
    return out


class SearchEngine:
    def __init__(
        self,
        storage,
        job_id: int,
        executor_factory: Callable[[SearchConfig], Executor],
        stop: threading.Event | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        lease_owner: str | None = None,
        tracker=None,
    ):
        self.storage, self.job_id = storage, job_id
        # Under a service runner's lease, status changes go through the lease: a runner that lost the job
        # (cancelled, or taken over after its lease lapsed) writes no status.
        self.lease_owner = lease_owner
        self.executor_factory = executor_factory
        self.stop = stop or StopEvent()
        self.on_progress = on_progress
        # An experiment tracker (search.tracking), told of every recorded result; its errors never stop the
        # search: the first is logged and tracking ends for this run.
        self.tracker = tracker
        job = self.job = storage.get_job(job_id)
        self.config = SearchConfig.model_validate(job.config)
        self.space = self.config.build_space()
        self.default_vocab_size = 257  # the byte tokenizer, when a stored result does not say
        # Multi-fidelity: candidates climb rungs of training steps (None: one training budget for all).
        self.rungs = RungRunner(self, self.config.fidelity) if self.config.fidelity is not None else None
        # Fixed per search: from the config's bounds, else (set once, in `after_tell`) from the initial
        # population's results; stored with the strategy state either way.
        bounds = self.config.hypervolume_bounds
        self.hv_space: HypervolumeSpace | None = (
            None
            if bounds is None
            else HypervolumeSpace(
                tuple(self.config.objectives),
                tuple(bounds[name][0] for name in self.config.objectives),
                tuple(bounds[name][1] for name in self.config.objectives),
            )
        )

    # ---- strategy state ------------------------------------------------------------------------------------
    def _strategy(self):
        config = self.config
        options = dict(config.strategy_options)
        if config.latency_lut:
            from search.latency_model import LatencyTable

            options["latency_table"] = LatencyTable.load(config.latency_lut)
        strategy = make_strategy(
            config.strategy,
            self.space,
            objectives=tuple(config.objectives),
            seed=config.seed,
            initial=initial_layouts(config, self.space, self.storage),
            constraints=config.constraints.model_dump(),
            **options,
        )
        state = self.storage.load_strategy_state(self.job_id)
        if state:
            strategy.load_state_dict(state["strategy"])
            if state.get("hypervolume_space"):
                self.hv_space = HypervolumeSpace.from_dict(state["hypervolume_space"])
            self._reconcile(strategy)
        return strategy

    def _reconcile(self, strategy) -> None:
        """After a crash, bring the strategy and the database back in step. The state is saved before the
        proposals are stored (so a stored candidate is always known to the strategy), and results are stored
        before the strategy hears of them; a kill between the two steps leaves a proposal the database lacks
        (stored now) or a result the strategy missed (told now)."""
        changed = False
        for layout_hash, proposal in list(strategy.pending.items()):
            cand = self.storage.find_candidate(self.job_id, layout_hash)
            if cand is None:
                self.storage.add_candidate(
                    self.job_id,
                    proposal.layout.to_json(None),
                    layout_hash,
                    parent_id=self._candidate_id(proposal.parent_hash),
                    generation=proposal.generation,
                    mutation=proposal.mutation,
                )
            elif cand.status in ("completed", "reused"):
                strategy.tell(layout_hash, cand.objectives)
                changed = True
            elif cand.status == "failed":
                strategy.tell(layout_hash, None)
                changed = True
        if self.rungs is not None and self.rungs.reconcile(strategy):
            changed = True
        if changed:
            log.info("resuming: the strategy heard of results stored just before the stop")
        self._save_state(strategy)

    def _save_state(self, strategy) -> None:
        self.storage.save_strategy_state(
            self.job_id,
            {
                "strategy": strategy.state_dict(),
                "hypervolume_space": self.hv_space.to_dict() if self.hv_space else None,
            },
        )

    # ---- the loop -----------------------------------------------------------------------------------------
    def run(self) -> Progress:
        """Run to the end of the budget, a stop, or a failure. A database that cannot be reached raises
        DatabaseUnavailable with nothing more written: the job stays under its lease, which lapses, and a
        runner takes it again and resumes it."""
        try:
            return self._run()
        except Exception as exc:
            if is_unavailable(exc) and not isinstance(exc, DatabaseUnavailable):
                log.error(
                    "job %d: database unavailable (%s); stopping to resume later",
                    self.job_id,
                    type(exc).__name__,
                )
                raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}") from exc
            raise

    def _run(self) -> Progress:
        storage, config = self.storage, self.config
        strategy = self._strategy()
        self._rebuild_front()  # a crash between a result and its front update must not leave it off the front
        requeued = self._requeue()  # in flight at a crash: rerun (attempts were counted)
        if requeued:
            log.info("resuming: %d evaluation(s) in flight at the stop go again", len(requeued))
        if self.lease_owner is None:
            storage.set_job_status(self.job_id, "running")
        try:
            executor = self.executor_factory(config)
        except WorkersUnavailable as exc:
            self._set_status("failed", error=str(exc))
            return self._progress()
        try:
            status, error = self._loop(executor, strategy), None
        except WorkersUnavailable as exc:  # no worker can be brought back: not a completed search
            log.error("job %d: %s", self.job_id, exc)
            status, error = "failed", str(exc)
        except BaseException as exc:
            if is_unavailable(exc):
                raise  # nothing can be written: resumed later (`run`)
            self._requeue()
            interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))  # resumable, not failed
            self._set_status("queued" if interrupted else "failed", error=None if interrupted else repr(exc))
            raise
        finally:
            executor.shutdown()
        if self.stop.is_set() and getattr(self.stop, "lost", False):
            return self._progress()  # another runner owns the job now: touch nothing of it
        if status != "completed":  # in flight at the stop: abandoned (shutdown killed them), rerun on resume
            self._requeue()
        self._set_status(status, error=error)
        return self._progress()

    def _requeue(self) -> list[int]:
        """Evaluations in flight at a stop back to pending (candidates and rung runs); the candidates' ids."""
        if self.rungs is not None:
            self.rungs.requeue()
        return self.storage.reset_running(self.job_id)

    def _loop(self, executor, strategy) -> str:
        """Keep every worker busy until the budget is spent (and, multi-fidelity, no candidate qualifies for
        a higher rung) or the stop is set; the status to end with."""
        config = self.config
        cycle = config.cycle or executor.capacity
        while not self.stop.is_set():
            done = self._count_done()
            in_flight = executor.in_flight()
            if done >= config.budget and not in_flight and not (self.rungs and self.rungs.has_work()):
                return "completed"
            free = executor.capacity - len(in_flight)
            if self.rungs is not None and free > 0:  # promotions first: they finish climbs
                free -= self.rungs.fill(executor, free)
            # Pending candidates first (resume, retries), then a new cycle of proposals. The budget counts
            # candidates (their first evaluation), not promotions.
            n_candidates = sum(1 for task_id in in_flight if not is_rung_task(task_id))
            room = min(free, config.budget - done - n_candidates)
            in_flight = executor.in_flight()
            if room > 0 and not self._fill(executor, strategy, room, cycle) and not in_flight:
                # Nothing pending, nothing running, and the strategy has no new layout: a grid that is done,
                # or a space smaller than the budget. The budget cannot be spent; the search is over.
                log.info(
                    "job %d: no new layout to evaluate (%d done of %d): finished",
                    self.job_id,
                    done,
                    config.budget,
                )
                return "completed"
            for outcome in executor.poll(timeout=0.5):
                self._handle(outcome, strategy, executor)
        return "cancelled" if getattr(self.stop, "cancel", False) else "queued"

    def _set_status(self, status: str, error: str | None = None) -> None:
        if self.lease_owner is None:
            self.storage.set_job_status(self.job_id, status, error=error)
        elif not self.storage.release_job(self.job_id, self.lease_owner, status, error=error):
            log.info(
                "job %d: no longer held by %s; its status stays as others set it",
                self.job_id,
                self.lease_owner,
            )

    def _count_done(self) -> int:
        counted = ("completed", "failed", "reused") if self.config.reused_counts else ("completed", "failed")
        return sum(self.storage.count_candidates(self.job_id, status=s) for s in counted)

    def _payload(self, cand) -> dict:
        c = self.config
        proxy = c.proxy if self.rungs is None else self.rungs.proxy(0)  # a candidate starts at rung 0
        return {
            "layout": json.dumps(cand.layout),
            "proxy": proxy.model_dump(),
            "latency": c.latency.model_dump(),
            "data": c.data.model_dump(),
        }

    def _fill(self, executor, strategy, room: int, cycle: int) -> int:
        """Submit pending candidates, then new proposals, up to `room`; how many were submitted or proposed
        (0: nothing pending and the strategy has no new layout)."""
        proposals: list = []
        pending = self.storage.candidates(self.job_id, status="pending", limit=room)
        if len(pending) < room:
            # Ask for exactly what is stored: a proposal dropped here would stay pending in the strategy.
            proposals = strategy.ask(min(cycle, room - len(pending)))
            # The asks are part of the state, saved BEFORE the candidates are stored: a resumed strategy must
            # know every stored candidate, or its restored random state would propose one again.
            self._save_state(strategy)
            known = {c.id for c in pending}
            for p in proposals:
                cid = self.storage.add_candidate(
                    self.job_id,
                    p.layout.to_json(None),
                    p.layout.content_hash,
                    parent_id=self._candidate_id(p.parent_hash),
                    generation=p.generation,
                    mutation=p.mutation,
                )
                cand = self.storage.get_candidate(cid)
                if cid not in known and cand.status == "pending":
                    known.add(cid)
                    pending.append(cand)
        for cand in pending:
            self.storage.mark_running(cand.id)  # an attempt: the worker computes its keys, then evaluates
            executor.submit(cand.id, self._payload(cand))
        return len(pending) + len(proposals)

    def _candidate_id(self, layout_hash: str | None) -> int | None:
        if layout_hash is None:
            return None
        found = self.storage.find_candidate(self.job_id, layout_hash)
        return found.id if found else None

    def _handle(self, outcome: Outcome, strategy, executor) -> None:
        if is_rung_task(outcome.task_id):
            self.rungs.handle(outcome, strategy, executor)
            return
        cand = self.storage.get_candidate(outcome.task_id)
        if outcome.keys is not None:
            self._keys_known(cand, outcome.keys, strategy, executor)
        elif outcome.result is not None:
            self._evaluated(cand, outcome.result, strategy)
        elif outcome.retryable and cand.attempts <= self.config.max_retries:
            log.warning("candidate %d: %s; retrying", cand.id, outcome.reason)
            self.storage.mark_running(cand.id)
            executor.submit(cand.id, self._payload(cand))
        else:  # retries ran out, or a failure that would only repeat (a corpus that does not load)
            self._failed(cand, outcome.reason, None, strategy)

    def _keys_known(self, cand, keys: ResultKeys, strategy, executor) -> None:
        """Reuse what is stored under the keys (this or another search evaluated it); evaluate the rest."""
        training = self.storage.get_training_result(keys.training_key)
        latency = self.storage.get_latency_result(keys.latency_key)
        training = training if training is not None and training.status == "completed" else None
        latency = latency if latency is not None and latency.status == "completed" else None
        if training is not None and latency is not None:
            executor.release(cand.id)
            self._complete(
                cand,
                keys,
                training.val_bpb,
                latency.decode_ms,
                strategy,
                reused=True,
                trained_params=(training.result or {}).get("n_params"),
            )
            return
        payload = {
            **self._payload(cand),
            "train": training is None,
            "measure_latency": latency is None,
            "keys": keys.to_dict(),
        }
        executor.evaluate(cand.id, payload)

    def _evaluated(self, cand, result: EvaluationResult, strategy) -> None:
        """Store what the worker measured (a training that completed is kept even if the latency phase then
        failed), then complete or fail the candidate."""
        self.store_training(result)
        if result.latency:
            self.storage.put_latency_result(
                result.latency_key,
                layout_hash=cand.layout_hash,
                decode_ms=result.decode_ms,
                device_fingerprint=result.device_fingerprint,
                result={**result.latency, "worker": result.worker},
            )
        if result.status != "completed":
            self._failed(cand, result.failure_reason, result.details(), strategy, result)
            return
        keys = ResultKeys(result.training_key, result.latency_key)
        training = self.storage.get_training_result(keys.training_key)
        latency = self.storage.get_latency_result(keys.latency_key)
        self._complete(
            cand,
            keys,
            training.val_bpb,
            latency.decode_ms,
            strategy,
            trained_params=(training.result or {}).get("n_params"),
        )

    def store_training(self, result: EvaluationResult) -> None:
        """A completed training under its key (kept even if the latency phase then failed), with where it
        ran and how long each phase took (data, model, training, latency)."""
        if not result.trained:
            return
        extra = {"log_tail": result.log_tail or [], "worker": result.worker, "timings": result.timings}
        self.storage.put_training_result(
            result.training_key,
            layout_hash=result.layout_hash,
            val_bpb=result.val_bpb,
            result={**result.training, **extra},
            artifact_path=result.artifact_path,
        )

    def _failed(self, cand, reason: str | None, details: str | None, strategy, result=None) -> None:
        """A failed candidate is data: its reason stored, the strategy told, the counts updated."""
        self.storage.fail_candidate(cand.id, reason or "failed (no reason given)", details)
        strategy.tell(cand.layout_hash, None)
        self.after_tell(strategy)
        self._track(cand.id, result)

    def _complete(
        self,
        cand,
        keys: ResultKeys,
        val_bpb,
        decode_ms,
        strategy,
        reused=False,
        trained_params: int | None = None,
    ) -> None:
        # The trained model's own count (its tokenizer's vocabulary); the analytic count with bytes otherwise.
        layout = Layout.from_dict(cand.layout)
        n_params = (
            int(trained_params) if trained_params else count_parameters(layout, self.default_vocab_size).total
        )
        objectives = self._objectives(val_bpb, decode_ms, n_params)
        self.storage.complete_candidate(
            cand.id,
            training_key=keys.training_key,
            latency_key=keys.latency_key,
            val_bpb=val_bpb,
            decode_ms=decode_ms,
            n_params=n_params,
            objectives=objectives,
            reused=reused,
        )
        if self.rungs is not None:
            steps = 0 if reused else self.rungs.proxy(0).total_steps
            self.rungs.first_rung_done(cand, keys.training_key, val_bpb, objectives, steps, reused)
        strategy.tell(cand.layout_hash, objectives)
        self.after_tell(strategy, completed_id=cand.id)
        self._track(cand.id)

    def _objectives(self, val_bpb, decode_ms, n_params) -> dict[str, float]:
        values = {"val_bpb": val_bpb, "decode_ms": decode_ms, "n_params": float(n_params)}
        return {name: values[name] for name in self.config.objectives}

    def objectives_of(self, cand, val_bpb: float) -> dict[str, float]:
        """A completed candidate's objectives with another training's val_bpb (a higher rung's)."""
        return self._objectives(val_bpb, cand.decode_ms, cand.n_params)

    def _track(self, candidate_id: int, result: EvaluationResult | None = None) -> None:
        """Hand a recorded result to the tracker: the candidate as stored, with the worker's result (a
        failure) or the stored training and latency results it completed with (evaluated or reused)."""
        if self.tracker is None:
            return
        cand = self.storage.get_candidate(candidate_id)
        if result is None and cand.training_key is not None:
            training = self.storage.get_training_result(cand.training_key)
            latency = self.storage.get_latency_result(cand.latency_key)
            result = EvaluationResult(
                status="completed",
                layout_hash=cand.layout_hash,
                training_key=cand.training_key,
                latency_key=cand.latency_key,
                training=training.result if training else None,
                latency=latency.result if latency else None,
            )
        try:
            self.tracker.log_evaluation(self.job, cand, result)
        except Exception as exc:  # tracking is a side channel: the search goes on without it
            log.warning(
                "job %d: experiment tracking failed (%s: %s); no more tracking for this run",
                self.job_id,
                type(exc).__name__,
                exc,
            )
            self.tracker = None

    def _front_of(self, candidates: list) -> list:
        """The non-dominated ones among these candidates, on the search's objectives (multi-fidelity: among
        those trained at the top rung)."""
        if self.rungs is not None:
            candidates = [c for c in candidates if self.rungs.at_top(c)]
        if not candidates:
            return []
        keep = pareto_front([[c.objectives[name] for name in self.config.objectives] for c in candidates])
        return [candidates[i] for i in keep]

    def _rebuild_front(self) -> None:
        done = self.storage.candidates(self.job_id, status=("completed", "reused"))
        if done:
            self.storage.set_front(self.job_id, [c.id for c in self._front_of(done)])

    def after_tell(self, strategy, completed_id: int | None = None) -> None:
        """Update the materialized front incrementally (the new result against the current front: the front of
        all results is the front of the old front plus the new point), then record hypervolume and progress.
        The cost does not grow with the number of candidates, so a 10,000-candidate search stays cheap."""
        names = self.config.objectives
        front = self.storage.candidates(self.job_id, status=("completed", "reused"), on_front=True)
        if completed_id is not None:
            front = self._front_of([*front, self.storage.get_candidate(completed_id)])
            self.storage.set_front(self.job_id, [c.id for c in front])
        points = [[c.objectives[name] for name in names] for c in front]
        n = self._count_done()
        hv = None
        if points:
            if self.hv_space is None:
                done = self.storage.candidates(self.job_id, status=("completed", "reused"))
                if len(done) >= min(self.config.budget, self._bounds_after()):
                    # Bounds fixed once, from the initial population's results, and stored with the history.
                    all_points = [[c.objectives[name] for name in names] for c in done]
                    uppers = tuple(1.2 * max(p[i] for p in all_points) for i in range(2))
                    self.hv_space = HypervolumeSpace(tuple(names), (0.0, 0.0), uppers)
            if self.hv_space is not None:
                hv = self.hv_space.hypervolume(points)  # the front's hypervolume is that of every result
                self.storage.record_hypervolume(self.job_id, n, hv)
        self.storage.update_progress(self.job_id, n)
        self._save_state(strategy)
        if self.on_progress is not None:
            self.on_progress(self._progress(hv))

    def _bounds_after(self) -> int:
        return int(self.config.strategy_options.get("population_size", 8))

    def _progress(self, hv: float | None = None) -> Progress:
        return Progress(
            self._count_done(),
            self.config.budget,
            self.storage.count_candidates(self.job_id, "failed"),
            self.storage.count_candidates(self.job_id, "reused"),
            hv,
        )
