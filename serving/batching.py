"""Adaptive micro-batching of single-history requests.

Scoring one history reads every decoder weight once (for a 3,500-item model, about 8 MB), so its
cost is memory traffic and per-call overhead, not arithmetic. Scoring 16 histories together
costs about as much as scoring 2 alone. Under load many single requests are in flight at once;
the :class:`MicroBatcher` hands them to one scoring thread, which takes *whatever is queued when
it becomes free* (up to ``max_batch``) and scores it as one batch.

Nothing waits for a batch to fill: an idle server scores a lone request at once (batch of 1),
so low-load latency is that of direct scoring plus one thread hand-off; batches grow only when
requests queue up anyway. Results are those of direct scoring (up to floating-point rounding:
a batched matrix product may sum in another order): each request keeps the model reference its
handler read, a group is scored with the largest ``k`` among its requests and every list is cut
to its own ``k`` (the ranking is a total order, score then position, so a shorter list is a
prefix of a longer one), and an error in a batch fails only that batch's requests, with the
error itself.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import Any

from serving.metrics import ServingMetrics
from serving.served import HistoryResult, ServedModel

__all__ = ["MicroBatcher"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    served: ServedModel
    history: Sequence[Any]
    weights: Sequence[float] | None
    exclude: Sequence[Any]
    k: int
    exclude_seen: bool
    include_latent: bool
    future: Future[HistoryResult] = field(default_factory=Future)


_STOP = object()


class MicroBatcher:
    """Coalesces concurrent single-history requests into batched model calls.

    Args:
        max_batch: Most histories scored together; 1 disables batching (callers score
            directly in their own thread).
        metrics: Where batch sizes are recorded.
    """

    def __init__(self, max_batch: int, metrics: ServingMetrics | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.metrics = metrics
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the scoring thread (no-op when batching is off or it already runs)."""
        with self._lock:
            if self.max_batch == 1 or self.running:
                return
            self._thread = threading.Thread(
                target=self._run, name="recvae-micro-batcher", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the queued requests and stop the scoring thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout)

    def recommend(
        self,
        served: ServedModel,
        history: Sequence[Any],
        k: int,
        *,
        weights: Sequence[float] | None = None,
        exclude: Sequence[Any] = (),
        exclude_seen: bool = True,
        include_latent: bool = False,
        explore: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> HistoryResult:
        """Top-``k`` for one history with ``served``, batched with concurrent requests.

        Blocks until the result is ready. Scores directly in the calling thread when the
        scoring thread is not running (batching off, before start-up, after shutdown), and
        always with ``explore``: a sample's noise depends on the history's row in the batch,
        so batching would make a seeded request's answer depend on its neighbours.

        Raises:
            Exception: whatever scoring raised for this request's batch.
        """
        if self.running and not explore:
            job = _Job(served, history, weights, exclude, k, exclude_seen, include_latent)
            self._queue.put(job)
            while True:
                try:
                    return job.future.result(timeout=0.5)
                except FutureTimeout:
                    # The thread stopped (shutdown) before taking this job: take it back.
                    if not self.running and job.future.cancel():
                        break
        [result] = served.recommend_histories(
            [history],
            k,
            weights=None if weights is None else [weights],
            exclude=[exclude],
            exclude_seen=exclude_seen,
            include_latent=include_latent,
            explore=explore,
            temperature=temperature,
            seed=seed,
        )
        return result

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            jobs: list[_Job] = [first]
            stop = False
            while len(jobs) < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True
                    break
                jobs.append(job)
            if self.metrics is not None:
                self.metrics.micro_batch_size.observe(len(jobs))
            groups: dict[tuple[int, bool], list[_Job]] = {}
            for job in jobs:
                if not job.future.set_running_or_notify_cancel():
                    continue  # its caller took it back
                groups.setdefault((id(job.served), job.exclude_seen), []).append(job)
            for group in groups.values():
                self._score(group)
            if stop:
                return

    @staticmethod
    def _score(group: list[_Job]) -> None:
        head = group[0]
        try:
            weighted = any(job.weights is not None for job in group)
            results = head.served.recommend_histories(
                [job.history for job in group],
                max(job.k for job in group),
                weights=[job.weights for job in group] if weighted else None,
                exclude=[job.exclude for job in group],
                exclude_seen=head.exclude_seen,
                include_latent=any(job.include_latent for job in group),
            )
        except Exception as exc:  # handed to every waiting request; the thread lives on
            for job in group:
                job.future.set_exception(exc)
            return
        for job, result in zip(group, results, strict=True):
            if len(result.items) > job.k or (result.mu is not None and not job.include_latent):
                result = replace(
                    result,
                    items=result.items[: job.k],
                    mu=result.mu if job.include_latent else None,
                    sigma=result.sigma if job.include_latent else None,
                )
            job.future.set_result(result)
