"""The stall watchdog: a stage that stops moving is a stall named by stage; a tracker that does not answer is not,
until it has been silent for longer than the stall timeout, and then the error says so."""
from __future__ import annotations

import time

from pipeline.progress import PipelineStalledError, ProgressUnobservableError, StallWatchdog

EXPECTED = 10
COUNTS = {"read": 10, "preprocess": 10, "inference": 4, "postprocess": 4}


class ScriptedWatchdog(StallWatchdog):
    """Answers from `script(seconds since start)`: a (counts, idle) pair, or an exception to raise."""

    def __init__(self, script, *, stall_timeout: float) -> None:
        super().__init__(tracker=None, expected=EXPECTED, stall_timeout=stall_timeout, poll_seconds=0.02)
        self._script = script
        self._began = time.monotonic()
        self.asked = 0

    def _ask_tracker(self) -> tuple[dict, float]:
        self.asked += 1
        answer = self._script(time.monotonic() - self._began)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def run_until_done(watchdog: StallWatchdog, seconds: float) -> None:
    watchdog.start()
    watchdog.join(timeout=seconds)
    watchdog.stop()
    watchdog.join(timeout=5)


def test_a_stage_that_stops_moving_is_a_stall_named_by_stage_with_its_real_idle_time():
    watchdog = ScriptedWatchdog(lambda elapsed: (COUNTS, 42.0), stall_timeout=30)
    run_until_done(watchdog, 5)
    assert isinstance(watchdog.failure, PipelineStalledError)
    assert not isinstance(watchdog.failure, ProgressUnobservableError)
    message = str(watchdog.failure)
    assert "no progress for 42 s; stalled in stage 'inference'" in message and "inference 4/10" in message


def test_a_tracker_that_stops_answering_for_a_while_is_not_a_stall():
    def tracker_lost_then_back(elapsed: float):
        if elapsed < 0.6:
            return TimeoutError("tracker restarting")  # its node's raylet restarting it, say
        return COUNTS, 0.1

    watchdog = ScriptedWatchdog(tracker_lost_then_back, stall_timeout=1.0)
    run_until_done(watchdog, 1.5)
    assert watchdog.failure is None
    assert watchdog.asked > 10, "the watchdog stopped polling"


def test_a_tracker_silent_beyond_the_stall_timeout_fails_saying_it_is_unreachable_not_stalled():
    watchdog = ScriptedWatchdog(lambda elapsed: ConnectionError("actor died with its node"), stall_timeout=0.5)
    run_until_done(watchdog, 5)
    assert isinstance(watchdog.failure, ProgressUnobservableError)
    message = str(watchdog.failure)
    assert "has not answered for" in message and "ConnectionError: actor died with its node" in message
    assert "stalled in stage" not in message and "1000000000" not in message


def test_the_default_poll_interval_follows_the_stall_timeout():
    """A twentieth of the timeout within [0.2 s, 5 s]: minutes-long timeouts poll every 5 s, short ones still catch a
    stall within about a twentieth of their length."""
    class Counting(StallWatchdog):
        asked = 0

        def _ask_tracker(self) -> tuple[dict, float]:
            self.asked += 1
            return COUNTS, 0.0

    assert [Counting(None, expected=EXPECTED, stall_timeout=t)._poll_seconds for t in (600, 40, 1)] == [5.0, 2.0, 0.2]
    watchdog = Counting(None, expected=EXPECTED, stall_timeout=2.0)  # polls every 0.2 s
    run_until_done(watchdog, 1.1)
    assert 3 <= watchdog.asked <= 6 and watchdog.failure is None
