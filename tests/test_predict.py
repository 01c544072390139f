"""The planner's model (xcsave.predict) on constructed profiles: no timing,
no domain; the real policies driven on model time."""

from __future__ import annotations

import math
import random

import pytest

from xcsave import policy
from xcsave.cli import parse_policy
from xcsave.policy import Verdict
from xcsave.predict import (
    Costs,
    Profile,
    coverage,
    pages_per_s,
    predict,
    working_set,
)

N = 262144  # 1 GiB of pages


def profile(rate: float, wss: int = N, *, seconds: float = 3.0, n: int = 30) -> Profile:
    """The profile uniform random writes at ``rate`` over ``wss`` pages would give
    (expected counts, not a random draw)."""
    dt = seconds / n
    per = round(coverage(wss, rate * dt))
    union = round(coverage(wss, rate * seconds))
    return Profile(N, tuple((dt, per) for _ in range(n)), union)


def test_coverage_is_the_occupancy() -> None:
    assert coverage(1000, 0) == 0
    assert coverage(1000, 1) == pytest.approx(1.0, rel=1e-3)
    assert coverage(1000, 1e9) == pytest.approx(1000)
    assert coverage(1000, 1000) == pytest.approx(1000 * (1 - math.exp(-1)))


def test_working_set_from_a_random_sample() -> None:
    """Counts drawn from real random writes: the fit finds the set they fell in."""
    rng = random.Random(7)
    for rate, wss in ((20000, 20000), (5000, 3000), (80000, N)):
        seen: set[int] = set()
        counts = []
        for _ in range(30):
            pages = {rng.randrange(wss) for _ in range(rate // 10)}
            counts.append(len(pages))
            seen |= pages
        writes, w = working_set(counts, len(seen), N)
        assert w == pytest.approx(wss, rel=0.03)
        assert writes / 3.0 == pytest.approx(rate, rel=0.03)


def test_no_overlap_means_the_whole_memory() -> None:
    """A sample with no page written twice cannot bound the set: all of memory."""
    writes, w = working_set([100] * 10, 1000, N)
    assert w == N
    assert writes == pytest.approx(1000, rel=1e-2)


def test_an_idle_guest() -> None:
    p = Profile(N, ((0.1, 0),) * 10, 0)
    assert p.dirty_rate == 0 and p.working_set == 0
    pr = predict(p, 25000, policy.xen_default)
    assert [r.pages for r in pr.rounds] == [N, 0]
    assert pr.rounds[-1].decision == "STOP_AND_COPY"
    assert pr.total_s == pytest.approx(N / 25000)
    assert pr.downtime_s == 0 and pr.go


def test_round_zero_then_the_dirty_set_of_each_round() -> None:
    p = profile(5000)
    link = 25000.0
    pr = predict(p, link, policy.xen_default, costs=Costs(setup_s=0.5, downtime_s=0.02))
    r0 = pr.rounds[0]
    assert (r0.pages, r0.seconds) == (N, N / link)
    # Each round sends what the previous one left dirty.
    rate, wss = p.dirty_rate, p.working_set
    for prev, nxt in zip(pr.rounds, pr.rounds[1:], strict=False):
        assert nxt.pages == round(coverage(wss, rate * prev.seconds))
    assert pr.downtime_s == pytest.approx(0.02 + pr.rounds[-1].pages / link)
    assert pr.total_s == pytest.approx(0.5 + sum(r.seconds for r in pr.rounds) + 0.02)


def test_xen_default_converges_on_a_slow_writer() -> None:
    pr = predict(profile(2000, 4000), 100000, policy.xen_default)
    assert pr.outcome == "stop" and pr.go
    assert "dirty < 50" in pr.reason or "rounds done" in pr.reason


def test_xen_default_stops_after_five_rounds_on_a_fast_writer() -> None:
    """Faster than the link: five rounds, then the working set as downtime."""
    p = profile(80000)
    pr = predict(p, 25000, policy.xen_default)
    assert pr.precopy_rounds == 5
    assert pr.reason == "5 rounds done"
    assert not pr.go and "no-go" in pr.why and "over the 300 ms target" in pr.why
    # The stop-and-copy sends nearly the whole working set.
    assert pr.rounds[-1].pages > 0.9 * p.working_set


def test_the_real_policy_is_driven_a_fresh_one_each_time() -> None:
    made = []

    def factory() -> policy.Policy:
        made.append(1)
        return policy.max_iterations(3)

    a = predict(profile(20000), 25000, factory)
    b = predict(profile(20000), 25000, factory)
    assert len(made) == 2
    assert a == b  # no clock: the same answer
    assert a.precopy_rounds == 3


def test_downtime_policy_reads_the_curve() -> None:
    """downtime:MS stops once the model's send rate and dirty count predict it;
    it cannot on the first ask (no round measured yet: Curve's first entry)."""
    pr = predict(profile(1000, 2000), 25000, lambda: parse_policy("downtime:100"))
    assert pr.outcome == "stop" and pr.precopy_rounds >= 2
    assert "predicted downtime" in pr.reason
    assert pr.downtime_s is not None and pr.downtime_s <= 0.1


def test_abort_is_no_go() -> None:
    pr = predict(profile(80000), 25000, lambda: parse_policy("converge"))
    assert pr.outcome == "abort" and not pr.go
    assert "abort" in pr.why and "not converging" in pr.why
    assert pr.downtime_s is None


def test_a_policy_that_never_stops() -> None:
    pr = predict(profile(80000), 25000, lambda: lambda st: policy.Decision.CONTINUE, max_rounds=50)
    assert pr.outcome == "endless" and not pr.go


def test_a_throttle_scales_the_dirty_rate_from_the_next_round() -> None:
    """A Verdict's throttle: (100 - t) / 100 of the rate, from the next round on."""

    def make() -> policy.Policy:
        def pol(st: policy.PrecopyStats) -> Verdict:
            if st.iteration >= 4:
                return Verdict(policy.Decision.STOP_AND_COPY, "enough")
            return Verdict(policy.Decision.CONTINUE, "slow down", throttle=50)

        return pol

    p = profile(80000)
    pr = predict(p, 25000, make)
    rate, wss = p.dirty_rate, p.working_set
    r0, r1 = pr.rounds[0], pr.rounds[1]
    assert r1.pages == round(coverage(wss, rate * r0.seconds))  # round 0 ran unthrottled
    assert pr.rounds[2].pages == round(coverage(wss, rate * 0.5 * r1.seconds))
    assert pr.max_throttle == 50 and pr.throttled_s > 0
    plain = predict(p, 25000, lambda: policy.max_iterations(4))
    assert pr.downtime_s is not None and plain.downtime_s is not None
    assert pr.downtime_s < plain.downtime_s


def test_sent_fraction_shortens_round_zero() -> None:
    pr = predict(profile(0 + 1), 25000, policy.xen_default, costs=Costs(sent_fraction=0.75))
    assert pr.rounds[0].pages == round(N * 0.75)


@pytest.mark.parametrize("link", [0, -1, float("nan"), float("inf")])
def test_bad_link_rates(link: float) -> None:
    with pytest.raises(ValueError, match="link rate"):
        predict(profile(100), link, policy.xen_default)


def test_bytes_to_pages() -> None:
    assert pages_per_s(4104 * 1000) == pytest.approx(1000)


def test_as_dict_is_json() -> None:
    import json

    pr = predict(profile(5000), 25000, policy.xen_default)
    doc = json.loads(json.dumps(pr.as_dict()))
    assert doc["rounds"][0]["iteration"] == 0
    assert doc["go"] is pr.go
    assert json.loads(json.dumps(profile(5000).as_dict()))["memory_pages"] == N
