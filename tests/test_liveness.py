"""The watchdog's evidence (bootkey.liveness): which loops have shown progress lately."""

from __future__ import annotations

import pytest

from bootkey.liveness import Liveness, Stale


def test_every_loop_must_beat_within_the_limit() -> None:
    lv = Liveness(limit=10.0)
    for name in ("main", "renewal", "keysocket", "hotplug", "kes", "control"):
        lv.beat(name, now=0.0)
    assert lv.healthy(now=10.0)
    for name in ("main", "renewal", "keysocket", "hotplug", "control"):
        lv.beat(name, now=9.0)
    assert lv.stale(now=10.5) == ["kes"]
    assert lv.details(now=10.5) == [Stale("kes", 10.5)]
    lv.beat("kes", now=11.0)
    assert lv.healthy(now=11.0)


def test_bounded_work_is_not_a_hang_until_its_bound_passes() -> None:
    lv = Liveness(limit=10.0)
    lv.beat("renewal", now=0.0, busy_until=100.0)  # a login retried until its deadline
    assert lv.healthy(now=99.0)
    assert lv.stale(now=101.0) == ["renewal"]
    lv.beat("renewal", now=101.0)  # done: back to the limit
    assert lv.healthy(now=105.0)
    assert not lv.healthy(now=112.0)


def test_a_stopped_loop_is_forgotten_and_an_unknown_one_never_counts() -> None:
    lv = Liveness(limit=1.0)
    assert lv.healthy(now=1000.0)  # nothing registered yet: start-up
    lv.beat("hotplug", now=0.0)
    lv.forget("hotplug")
    assert lv.healthy(now=50.0) and lv.loops() == []


def test_tick_leaves_room_inside_the_limit() -> None:
    assert Liveness(limit=60.0).tick == 15.0
    with pytest.raises(ValueError):
        Liveness(limit=0)
