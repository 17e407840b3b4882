"""The one driver of per-slide stages: plan a slide, then run its blocks, bounded.

Tiling and inference work the same way: one task plans a slide (overview,
tissue, patch grid) and its outcome says which block tasks the slide needs
(chunks of patches to extract, blocks of patches to predict). A stage says
what those tasks are and what to do with their outcomes (:class:`Stage`);
:func:`drive` runs them.

On a Dask client the driver keeps a bounded window of tasks in flight: plans
first, at most ``max_active`` slides planned but unfinished (so the driver's
memory stays bounded whatever the cohort size, and the next slide is planned
while this one's blocks run), then blocks in slide order. Without a client
the same stage runs in this process, one slide and one block after another:
the Prefect flows' per-slide tasks run it that way, so there is no second
implementation of a stage.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from pipeline.cluster import submit_reporting, task_error

J = TypeVar("J")  # what the stage calls a slide's job
S = TypeVar("S")  # the stage's state of a slide being worked on


@dataclass(frozen=True)
class Task:
    """A function and its arguments: a reference, run on a Dask worker or in this process."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def run(self) -> Any:
        return self.fn(*self.args, **self.kwargs)

    def submit(self, client: Any) -> Any:
        return submit_reporting(client, self.fn, *self.args, **self.kwargs)


class Stage(Protocol[J, S]):
    """What a per-slide stage tells :func:`drive`; called in the driver, in order per slide."""

    def plan(self, job: J, waiting: int) -> Task:
        """The task that plans ``job``; ``waiting`` slides are still to be planned after it."""
        ...

    def start(self, job: J, planned: Any) -> tuple[S, Sequence[Task]]:
        """The slide's state and its block tasks, from its plan's outcome (no blocks: done)."""
        ...

    def block_done(self, job: J, state: S, index: int, outcome: Any) -> None:
        """Block ``index`` of the slide came back with ``outcome``."""
        ...

    def finish(self, job: J, state: S, seconds: float) -> None:
        """Every block of the slide is done; ``seconds`` since its plan was submitted."""
        ...

    def fail(self, job: J, error: BaseException) -> None:
        """A task of the slide failed: its other blocks are dropped. Raise to stop the run."""
        ...


def drive(
    client: Any | None,
    stage: Stage[J, S],
    jobs: Sequence[J],
    *,
    max_active: int = 1,
    max_in_flight: int = 1,
) -> None:
    """Run ``stage`` on every job: on the Dask ``client``, or in this process if it is None.

    On Dask a failing task goes to ``stage.fail`` and the other slides go on.
    In this process a failing task raises its error: the caller runs one
    slide per call and fails with it (the Prefect flows' per-slide tasks).
    """
    if client is None:
        _drive_here(stage, jobs)
    else:
        _Driver(client, stage, jobs, max_active, max_in_flight).run()


def _drive_here(stage: Stage[J, S], jobs: Sequence[J]) -> None:
    for i, job in enumerate(jobs):
        started = time.perf_counter()
        state, blocks = stage.start(job, stage.plan(job, len(jobs) - i - 1).run())
        for index, block in enumerate(blocks):
            stage.block_done(job, state, index, block.run())
        stage.finish(job, state, time.perf_counter() - started)


@dataclass
class _Active(Generic[S]):
    """A planned slide whose blocks are running (driver-side)."""

    state: S
    remaining: int
    started: float


class _Driver(Generic[J, S]):
    def __init__(
        self,
        client: Any,
        stage: Stage[J, S],
        jobs: Sequence[J],
        max_active: int,
        max_in_flight: int,
    ) -> None:
        from distributed import as_completed

        self.client, self.stage, self.jobs = client, stage, jobs
        self.max_active, self.max_in_flight = max_active, max_in_flight
        self.waiting: deque[int] = deque(range(len(jobs)))
        self.blocks: deque[tuple[int, int, Task]] = deque()  # slide, block index, task
        self.plans: dict[Any, tuple[int, float]] = {}  # future -> slide, start time
        self.running: dict[Any, tuple[int, int]] = {}  # future -> slide, block index
        self.active: dict[int, _Active[S]] = {}
        # Results come with the completion events: future.result() would cost a
        # synchronous round trip (~8 ms) per task in the driver.
        self.work = as_completed(loop=client.loop, with_results=True, raise_errors=False)

    def run(self) -> None:
        self.submit_some()
        for future, outcome in self.work:
            error = task_error(future, outcome)
            if future in self.plans:
                self.planned(future, outcome, error)
            else:
                self.block_back(future, outcome, error)
            self.submit_some()

    def submit_some(self) -> None:
        while self.work.count() < self.max_in_flight:
            # Plans first (at most max_active slides at once): the next slides are
            # planned while this one's blocks run, so workers never wait for a plan.
            if self.waiting and len(self.active) + len(self.plans) < self.max_active:
                i = self.waiting.popleft()
                task = self.stage.plan(self.jobs[i], len(self.waiting))
                future = task.submit(self.client)
                self.plans[future] = (i, time.perf_counter())
            elif self.blocks:
                i, index, task = self.blocks.popleft()
                if i not in self.active:
                    continue  # the slide failed meanwhile
                future = task.submit(self.client)
                self.running[future] = (i, index)
            else:
                return
            self.work.add(future)

    def planned(self, future: Any, outcome: Any, error: BaseException | None) -> None:
        i, started = self.plans.pop(future)
        job = self.jobs[i]
        if error is not None:
            self.stage.fail(job, error)
            return
        state, blocks = self.stage.start(job, outcome)
        if not blocks:
            self.stage.finish(job, state, time.perf_counter() - started)
            return
        self.active[i] = _Active(state, len(blocks), started)
        self.blocks.extend((i, index, task) for index, task in enumerate(blocks))

    def block_back(self, future: Any, outcome: Any, error: BaseException | None) -> None:
        i, index = self.running.pop(future)
        active = self.active.get(i)
        if active is None:  # an earlier block of this slide failed
            return
        job = self.jobs[i]
        if error is not None:
            del self.active[i]
            self.stage.fail(job, error)
            return
        self.stage.block_done(job, active.state, index, outcome)
        active.remaining -= 1
        if active.remaining == 0:
            del self.active[i]
            self.stage.finish(job, active.state, time.perf_counter() - active.started)


def worker_count(client: Any) -> int:
    """Workers of the Dask ``client``'s cluster (at least 1)."""
    return max(1, len(client.scheduler_info().get("workers", {})))


def failures(results: list[Any]) -> list[dict[str, str]]:
    """The failed slides of a stage's results: slide id, path and the one-line reason."""
    return [
        {"slide": r.slide_id, "path": r.path, "reason": r.reason}
        for r in results
        if r.status == "failed"
    ]
