"""Precopy policies: what they are given (PrecopyStats with the supervisor's
measurements, built by policy.Curve), how they answer (Decision or Verdict),
and what the events say about each round.  Decisions are checked on recorded
curves: no clock is read."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

import xcsave
from xcsave import policy, sim
from xcsave.events import Event, PolicyEvent
from xcsave.policy import Curve, Decision, PrecopyStats, Verdict, as_verdict

MiB = 1 << 20


def curve(*rounds: tuple[int, int, int, float]) -> list[PrecopyStats]:
    """(iteration, total_written, dirty_count, elapsed) as the supervisor hands them over."""
    c = Curve()
    return [c.add(PrecopyStats(i, w, d), t) for i, w, d, t in rounds]


def test_curve_measures_the_round_that_ended() -> None:
    first, second = curve((1, 1000, 300, 2.0), (2, 1300, 100, 2.5))
    assert (first.elapsed, first.round_s, first.send_rate, first.dirty_rate) == (2.0, 0, 0, 0)
    assert first.predicted_downtime_s is None  # no round measured yet
    assert second.round_s == pytest.approx(0.5)
    assert second.sent == 300
    assert second.send_rate == pytest.approx(600.0)  # 300 pages in 0.5 s
    assert second.dirty_rate == pytest.approx(200.0)  # 100 dirty after 0.5 s
    assert second.predicted_downtime_s == pytest.approx(100 / 600)


def test_curve_unknown_dirty_count_gives_no_rate() -> None:
    _, second = curve((1, 1000, -1, 1.0), (2, 1100, -1, 2.0))
    assert second.dirty_rate == 0.0
    assert second.predicted_downtime_s is None


def test_as_verdict() -> None:
    assert as_verdict(Decision.STOP_AND_COPY) == Verdict(Decision.STOP_AND_COPY)
    assert as_verdict(0) == Verdict(Decision.CONTINUE)
    v = Verdict(Decision.ABORT, "why")
    assert as_verdict(v) is v
    with pytest.raises(ValueError, match="7 is not a valid Decision"):
        as_verdict(7)
    with pytest.raises(TypeError):
        as_verdict("stop")


def test_policies_give_reasons() -> None:
    rounds = curve((1, 1000, 40, 1.0), (5, 2000, 400, 2.0))
    xen = policy.xen_default()
    assert as_verdict(xen(rounds[0])) == Verdict(Decision.STOP_AND_COPY, "40 dirty < 50")
    assert as_verdict(xen(rounds[1])) == Verdict(Decision.STOP_AND_COPY, "5 rounds done")
    assert as_verdict(policy.max_iterations(9)(rounds[1])).decision == Decision.CONTINUE


def test_downtime_target_reads_the_measured_rate() -> None:
    # 1000 pages in 1 s: 400 dirty is 400 ms, 100 dirty is 100 ms.
    slow = curve((1, 5000, 900, 1.0), (2, 6000, 400, 2.0))
    fast = curve((1, 5000, 900, 1.0), (2, 6000, 100, 2.0))
    target = policy.downtime_target(0.2)
    assert as_verdict(target(slow[0])).decision == Decision.CONTINUE  # nothing measured
    assert as_verdict(target(slow[1])).decision == Decision.CONTINUE
    v = as_verdict(target(fast[1]))
    assert v.decision == Decision.STOP_AND_COPY
    assert v.reason == "predicted downtime 100 ms <= target 200 ms"


def test_first_of_keeps_a_throttle_when_all_continue() -> None:
    st = curve((1, 10, 10, 1.0))[0]
    slow = policy.first_of(
        lambda _: Verdict(Decision.CONTINUE),
        lambda _: Verdict(Decision.CONTINUE, "too fast", throttle=20),
        lambda _: Verdict(Decision.CONTINUE, "also", throttle=50),
    )
    assert as_verdict(slow(st)) == Verdict(Decision.CONTINUE, "too fast", throttle=20)
    stop = policy.first_of(
        lambda _: Verdict(Decision.CONTINUE, "too fast", throttle=20),
        lambda _: Decision.STOP_AND_COPY,
    )
    assert as_verdict(stop(st)) == Verdict(Decision.STOP_AND_COPY)


async def test_events_explain_every_round(shm_dir: Path) -> None:
    """A live save's policy events carry each round's measurements and the
    policy's reason, and the policy is handed the same measurements."""
    src = sim.create(shm_dir / "src.dom", 16 * MiB, seed=3)
    seen: list[PrecopyStats] = []
    events: list[Event] = []

    def pol(st: PrecopyStats) -> Verdict:
        seen.append(st)
        if st.iteration >= 3:
            return Verdict(Decision.STOP_AND_COPY, "three is enough")
        return Verdict(Decision.CONTINUE, f"round {st.iteration} goes on")

    await xcsave.save(shm_dir / "out", sim=src, live=True, policy=pol, on_event=events.append)
    got = [e for e in events if isinstance(e, PolicyEvent)]
    assert [e.iteration for e in got] == [s.iteration for s in seen] == [1, 2, 3]
    assert [e.reason for e in got] == ["round 1 goes on", "round 2 goes on", "three is enough"]
    assert [e.decision for e in got] == [0, 0, 1]
    assert all(b.elapsed >= a.elapsed > 0 for a, b in itertools.pairwise(seen))
    for e, s in zip(got, seen, strict=True):
        assert (e.elapsed, e.round_s, e.sent, e.send_rate) == (
            s.elapsed,
            s.round_s,
            s.sent,
            s.send_rate,
        )
    assert seen[1].sent == seen[1].total_written - seen[0].total_written


async def test_a_policy_answering_nonsense_fails_the_save(shm_dir: Path) -> None:
    src = sim.create(shm_dir / "src.dom", 4 * MiB, seed=3)
    bad = lambda st: "stop"  # noqa: E731
    with pytest.raises(xcsave.CallbackError, match="must return a Decision or a Verdict"):
        await xcsave.save(shm_dir / "out", sim=src, live=True, policy=bad)  # type: ignore[arg-type]
    assert sim.info(src)["state"] == "running"
    assert not (shm_dir / "out").exists()
