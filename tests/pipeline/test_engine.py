"""The one driver of per-slide stages, on a real Dask scheduler and inline."""

from __future__ import annotations

import pytest
from distributed import Client, LocalCluster

from pipeline.engine import Task, drive
from pipeline.errors import SlideError


def plan_numbers(n: int) -> list[list[int]]:
    """A toy slide ``n``: the numbers below it in blocks of 3 (a negative ``n`` is corrupt)."""
    if n < 0:
        raise SlideError(f"slide{n}.tif", "corrupt")
    return [list(range(i, min(i + 3, n))) for i in range(0, n, 3)]


def square_sum(block: list[int]) -> int:
    if block == [12, 13]:  # the last block of slide 14 only
        raise ValueError("unlucky block")
    return sum(x * x for x in block)


class SumOfSquares:
    """A stage whose answer per slide is known: sum of squares below n, from its blocks."""

    def __init__(self, stop_on: type[BaseException] | None = None) -> None:
        self.done: dict[int, int] = {}
        self.failed: dict[int, str] = {}
        self.open = self.most_open = 0
        self.stop_on = stop_on

    def plan(self, n: int, waiting: int) -> Task:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        return Task(plan_numbers, (n,))

    def start(self, n: int, blocks: list[list[int]]) -> tuple[dict[int, int], list[Task]]:
        return {}, [Task(square_sum, (block,)) for block in blocks]

    def block_done(self, n: int, parts: dict[int, int], index: int, outcome: int) -> None:
        assert index not in parts
        parts[index] = outcome

    def finish(self, n: int, parts: dict[int, int], seconds: float) -> None:
        self.open -= 1
        self.done[n] = sum(parts.values())

    def fail(self, n: int, error: BaseException) -> None:
        self.open -= 1
        if self.stop_on is not None and isinstance(error, self.stop_on):
            raise error
        self.failed[n] = str(error)


def expected(n: int) -> int:
    return sum(x * x for x in range(n))


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        yield client


def test_every_slide_finishes_with_all_its_blocks_and_failures_stay_with_their_slide(client):
    jobs = [10, 0, 40, -1, 14, 7, 25, 3]
    stage = SumOfSquares()
    drive(client, stage, jobs, max_active=2, max_in_flight=3)
    assert stage.done == {n: expected(n) for n in jobs if n >= 0 and n != 14}
    assert stage.failed == {-1: "slide-1.tif: corrupt", 14: "unlucky block"}
    assert stage.most_open <= 2  # the window of planned, unfinished slides holds


def test_inline_runs_the_same_stage_in_this_process_and_raises_a_slides_error():
    stage = SumOfSquares()
    drive(None, stage, [10, 0, 40])
    assert stage.done == {10: expected(10), 0: 0, 40: expected(40)}
    with pytest.raises(SlideError, match="slide-1.tif: corrupt"):
        drive(None, SumOfSquares(), [-1])
    with pytest.raises(ValueError, match="unlucky"):
        drive(None, SumOfSquares(), [14])


def test_a_stage_stops_the_whole_run_by_raising_from_fail(client):
    """A full disk or an unusable model is not one slide's fault: the run stops."""
    stage = SumOfSquares(stop_on=SlideError)
    with pytest.raises(SlideError, match="corrupt"):
        drive(client, stage, [5, -1, 8], max_active=1, max_in_flight=1)
