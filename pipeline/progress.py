"""Per-stage progress counts and the stall watchdog that turns a silent hang into an error naming the stage.

Every stage reports how many images it finished to one small `ProgressTracker` actor (fire-and-forget
calls, zero CPUs so it is always schedulable). The driver's watchdog polls it; when no stage has moved for
`stall_timeout` seconds, it names the first stage that has not finished all its images: upstream stages
that are done have nothing left to give, so that stage is where the work is stuck.

The tracker lives on the driver's node (`start_progress_tracker`): a worker node that dies takes Ray Data's
tasks and actors with it, which Ray retries and restarts elsewhere, but never the tracker. Should its process
die anyway it is restarted in place (its counts start again from zero, its idle clock too). A tracker that
does not answer is not a stall: the watchdog says so, and gives up only when it has heard nothing for
`stall_timeout` seconds.
"""
from __future__ import annotations

import logging
import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

__all__ = ["STAGES", "ProgressTracker", "StallWatchdog", "PipelineStalledError", "ProgressUnobservableError",
           "report_progress", "start_progress_tracker"]

logger = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("read", "preprocess", "inference", "postprocess")
_STAGE_DESCRIPTIONS = {
    "read": "read tasks (fetching object bytes; starved of CPU if the actor pools take every CPU)",
    "preprocess": "decode/preprocess actors",
    "inference": "model actors",
    "postprocess": "post-process/write actors",
}


class PipelineStalledError(RuntimeError):
    """The job made no progress for longer than --stall-timeout."""


class ProgressUnobservableError(PipelineStalledError):
    """The progress tracker did not answer for longer than --stall-timeout: the job cannot watch itself."""


@ray.remote(num_cpus=0)
class ProgressTracker:
    """Counts finished images per stage; `snapshot` also says how long ago anything moved."""

    def __init__(self) -> None:
        self._counts = {stage: 0 for stage in STAGES}
        self._last_change = time.monotonic()

    def add(self, stage: str, count: int) -> None:
        self._counts[stage] = self._counts.get(stage, 0) + count
        if count:
            self._last_change = time.monotonic()

    def touch(self) -> None:
        """Marks activity that is not a finished image (e.g. an actor finished loading its model)."""
        self._last_change = time.monotonic()

    def snapshot(self) -> tuple[dict, float]:
        return dict(self._counts), time.monotonic() - self._last_change


def start_progress_tracker():
    """A ProgressTracker pinned to the driver's node (it shares the driver's fate, not a worker's), restarted in
    place if its process dies."""
    driver_node = ray.get_runtime_context().get_node_id()
    return ProgressTracker.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=driver_node, soft=False),
        max_restarts=-1, max_task_retries=-1).remote()


def report_progress(tracker, stage: str, count: int) -> None:
    """Fire-and-forget: progress reporting must never slow down or fail a stage."""
    if tracker is None:
        return
    try:
        tracker.add.remote(stage, count)
    except Exception:  # noqa: BLE001 - a lost count only delays the watchdog, never the data
        logger.debug("progress report for %s lost", stage, exc_info=True)


def describe_stall(counts: dict, expected: int, idle_seconds: float) -> str:
    """A one-line diagnosis: which stage is stuck and how far every stage got."""
    stalled = next((stage for stage in STAGES if counts.get(stage, 0) < expected), STAGES[-1])
    progress = ", ".join(f"{stage} {counts.get(stage, 0)}/{expected}" for stage in STAGES)
    return (f"no progress for {idle_seconds:.0f} s; stalled in stage '{stalled}' "
            f"({_STAGE_DESCRIPTIONS[stalled]}). Images finished per stage: {progress}. "
            "Check `ray status` for pending actors or tasks, and the worker logs for errors.")


class StallWatchdog(threading.Thread):
    """Polls the tracker; on a stall, or a tracker silent for longer than the stall timeout, it records `failure`
    and stops (the driver waits on it and raises it)."""

    def __init__(self, tracker, *, expected: int, stall_timeout: float, poll_seconds: float | None = None,
                 answer_timeout: float = 10.0) -> None:
        super().__init__(name="m2f-stall-watchdog", daemon=True)
        self._tracker = tracker
        self._expected = expected
        self._stall_timeout = stall_timeout
        # Default: a twentieth of the timeout, within [0.2 s, 5 s]. Each poll wakes the driver, Ray and the
        # tracker; a stall is a matter of minutes (the default timeout is 10), not of seconds.
        self._poll_seconds = poll_seconds if poll_seconds is not None else min(5.0, max(0.2, stall_timeout / 20))
        self._answer_timeout = answer_timeout
        self._stop_event = threading.Event()
        self.failure: PipelineStalledError | None = None

    def run(self) -> None:
        last_answer = time.monotonic()
        while not self._stop_event.wait(self._poll_seconds):
            try:
                counts, idle = self._ask_tracker()
            except Exception as error:  # noqa: BLE001 - unreachable is not stalled: wait for it, up to a point
                silent = time.monotonic() - last_answer
                logger.warning("progress tracker has not answered for %.0f s (%s: %s); not counted as a stall",
                               silent, type(error).__name__, error)
                if silent > self._stall_timeout:
                    self._fail(ProgressUnobservableError(
                        f"the progress tracker on the driver's node has not answered for {silent:.0f} s "
                        f"({type(error).__name__}: {error}); the job cannot tell whether it progresses. "
                        "Check `ray status` and the driver node's logs."))
                    return
                continue
            last_answer = time.monotonic()
            if idle > self._stall_timeout:
                self._fail(PipelineStalledError(describe_stall(counts, self._expected, idle)))
                return

    def _ask_tracker(self) -> tuple[dict, float]:
        return ray.get(self._tracker.snapshot.remote(), timeout=self._answer_timeout)

    def _fail(self, failure: PipelineStalledError) -> None:
        self.failure = failure
        logger.error("%s", failure)

    def stop(self) -> None:
        self._stop_event.set()
