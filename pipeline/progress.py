"""Per-stage progress counts and the stall watchdog that turns a silent hang into an error naming the stage.

Every stage reports how many images it finished to one small `ProgressTracker` actor (fire-and-forget
calls, zero CPUs so it is always schedulable). The driver's watchdog polls it; when no stage has moved for
`stall_timeout` seconds, it names the first stage that has not finished all its images: upstream stages
that are done have nothing left to give, so that stage is where the work is stuck.
"""
from __future__ import annotations

import logging
import threading
import time

import ray

__all__ = ["STAGES", "ProgressTracker", "StallWatchdog", "PipelineStalledError", "report_progress"]

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
    """Polls the tracker; on a stall it records `stall_message` and stops (the driver waits on it)."""

    def __init__(self, tracker, *, expected: int, stall_timeout: float, poll_seconds: float = 1.0) -> None:
        super().__init__(name="m2f-stall-watchdog", daemon=True)
        self._tracker = tracker
        self._expected = expected
        self._stall_timeout = stall_timeout
        self._poll_seconds = poll_seconds
        self._stop_event = threading.Event()
        self.stall_message: str | None = None

    def run(self) -> None:
        while not self._stop_event.wait(self._poll_seconds):
            try:
                counts, idle = ray.get(self._tracker.snapshot.remote(), timeout=max(30.0, self._stall_timeout))
            except Exception as error:  # noqa: BLE001 - a tracker that cannot answer is itself a stall
                counts, idle = {}, float("inf")
                logger.warning("progress tracker did not answer: %s", error)
            if idle > self._stall_timeout:
                self.stall_message = describe_stall(counts, self._expected, min(idle, 1e9))
                logger.error(self.stall_message)
                return

    def stop(self) -> None:
        self._stop_event.set()
