"""PeriodicLoop: the one background loop behind the canary, retention and due-round checks."""

import logging
import threading
import time

from rlhf_core.periodic import PeriodicLoop
from tests.conftest import wait_for


def test_ticks_repeatedly_on_a_named_daemon_thread():
    seen: list[threading.Thread] = []
    loop = PeriodicLoop(lambda: seen.append(threading.current_thread()), 0.01, "test-loop")
    assert loop.start() is loop
    try:
        wait_for(lambda: len(seen) >= 3, 10, "three ticks", interval_s=0.005)
    finally:
        loop.stop()
    assert all(t.name == "test-loop" and t.daemon for t in seen)
    assert threading.current_thread() not in seen


def test_first_tick_waits_one_interval():
    calls: list[float] = []
    loop = PeriodicLoop(lambda: calls.append(time.monotonic()), 30.0, "slow-loop").start()
    time.sleep(0.1)
    began = time.monotonic()
    loop.stop()
    # stop() wakes the waiting thread at once rather than after the 30 s interval
    assert calls == [] and time.monotonic() - began < 2.0 and not loop.running


def test_stop_ends_the_ticks():
    calls: list[int] = []
    loop = PeriodicLoop(lambda: calls.append(1), 0.01, "test-loop").start()
    wait_for(lambda: calls, 10, "a first tick", interval_s=0.005)
    loop.stop()
    assert not loop.running
    after_stop = len(calls)
    time.sleep(0.1)
    assert len(calls) == after_stop
    loop.start()  # a stopped loop stays stopped
    time.sleep(0.1)
    assert len(calls) == after_stop


def test_start_twice_runs_one_thread():
    calls: list[int] = []
    loop = PeriodicLoop(lambda: calls.append(1), 0.01, "test-loop").start()
    first = loop._thread
    assert loop.start()._thread is first
    loop.stop()


def test_an_exception_is_logged_and_the_next_tick_runs(caplog):
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("redis went away")

    with caplog.at_level(logging.ERROR, logger="rlhf_core.periodic"):
        loop = PeriodicLoop(flaky, 0.01, "test-loop", "flaky chore").start()
        try:
            wait_for(lambda: len(calls) >= 3, 10, "ticks after the failing one", interval_s=0.005)
            assert loop.running
        finally:
            loop.stop()
    failures = [r for r in caplog.records if r.getMessage() == "flaky chore failed"]
    assert len(failures) == 1
    assert failures[0].exc_info[0] is RuntimeError


def test_the_worker_loops_tick_at_their_settings():
    from rlhf_core.canary import CanaryLoop
    from rlhf_core.privacy import RetentionLoop
    from rlhf_core.settings import Settings
    from rlhf_core.upkeep import DueRoundLoop

    settings = Settings(canary_check_s=7.0, round_check_s=0.0)
    assert CanaryLoop(settings).every_s == 7.0
    assert RetentionLoop(settings, every_s=3.0).every_s == 3.0
    # RLHF_ROUND_CHECK_S=0 turns the due-round check off rather than spinning a core
    due = DueRoundLoop(settings, send=lambda reason: None).start()
    assert due._thread is None and not due.running
    due.stop()


def test_a_zero_interval_is_off_for_every_loop():
    """RLHF_CANARY_CHECK_S=0 (or any loop at 0 s) spun a core calling its chore back to
    back; 0 now means off for every loop, as it already did for RLHF_ROUND_CHECK_S."""
    from rlhf_core.canary import CanaryLoop
    from rlhf_core.settings import Settings

    calls: list[int] = []
    loop = PeriodicLoop(lambda: calls.append(1), 0.0, "zero").start()
    time.sleep(0.2)
    loop.stop()
    assert calls == [] and not loop.running
    canary = CanaryLoop(Settings(canary_check_s=0.0)).start()
    assert canary._thread is None and not canary.running
    canary.stop()
