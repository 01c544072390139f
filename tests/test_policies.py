"""The policies that read the curve (stall, downtime ramp, guarantee), how
they compose, the ``--policy`` grammar, and how each decision is explained
(``--progress plain`` lines, the ``--json`` result's rounds).

Decisions are checked on recorded curves built with :class:`policy.Curve`:
no clock is read, so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from test_cli import xcsave_cli

from xcsave import cli, policy, sim
from xcsave.events import PolicyEvent
from xcsave.policy import Curve, Decision, Policy, PrecopyStats, Verdict, as_verdict
from xcsave.progress import Renderer, policy_line, policy_round

C, S, A = Decision.CONTINUE, Decision.STOP_AND_COPY, Decision.ABORT
MiB = 1 << 20


def steady(*dirty: int) -> list[PrecopyStats]:
    """Rounds of one second that each send 1000 pages: from the second round
    on, the predicted downtime in ms is the dirty count (the first has no
    measured rate: unknown)."""
    c = Curve()
    return [
        c.add(PrecopyStats(i, 10_000 + 1000 * (i - 1), d), float(i))
        for i, d in enumerate(dirty, 1)
    ]


def ask(pol: Policy, rounds: list[PrecopyStats]) -> list[Verdict]:
    """The policy's verdicts, round after round, up to the first that is not
    CONTINUE (the helper asks no more after it)."""
    out: list[Verdict] = []
    for st in rounds:
        out.append(as_verdict(pol(st)))
        if out[-1].decision != Decision.CONTINUE:
            break
    return out


def decisions(pol: Policy, rounds: list[PrecopyStats]) -> list[Decision]:
    return [v.decision for v in ask(pol, rounds)]


def passthrough_throttle(inner: Policy, percent: int) -> Policy:
    """A stand-in for auto-converge's shape (xcsave.converge): the inner
    verdict, with a throttle added while it continues."""

    def pol(st: PrecopyStats) -> Verdict:
        v = as_verdict(inner(st))
        if v.decision != Decision.CONTINUE:
            return v
        return Verdict(v.decision, v.reason or "slowing the guest", percent)

    return pol


# ----------------------------------------------------------------- stall


def test_stall_stops_once_the_count_has_stopped_falling() -> None:
    rounds = steady(5000, 3000, 2000, 2000, 2100, 2500, 100)
    got = ask(policy.stall(3), rounds)
    assert [v.decision for v in got] == [C, C, C, C, C, S]  # at once: round 7 never asked
    assert [v.reason for v in got] == [
        "5000 dirty: a new low",
        "3000 dirty: a new low",
        "2000 dirty: a new low",
        "2000 dirty, no new low for 1 of 3 rounds (low 2000)",  # a tie is not a new low
        "2100 dirty, no new low for 2 of 3 rounds (low 2000)",
        "stalled: 2500 dirty, no new low for 3 rounds (low 2000 at round 3)",
    ]


def test_stall_a_new_low_starts_the_count_again() -> None:
    assert decisions(policy.stall(2), steady(500, 600, 400, 450, 460)) == [C, C, C, C, S]


def test_stall_on_a_rising_curve_stops_after_k_rounds() -> None:
    assert decisions(policy.stall(2), steady(100, 200, 300, 400)) == [C, C, S]
    assert decisions(policy.stall(1), steady(100, 200)) == [C, S]


def test_stall_keeps_going_while_the_count_falls_until_the_backstop() -> None:
    got = ask(policy.stall(2, max_iters=6), steady(*range(9000, 0, -1000)))
    assert [v.decision for v in got] == [C] * 5 + [S]
    assert got[-1].reason == "6 rounds done"


def test_stall_nothing_dirty_stops_at_once() -> None:
    assert ask(policy.stall(3), steady(0)) == [Verdict(S, "nothing is dirty")]
    assert decisions(policy.stall(3), steady(800, 0)) == [C, S]


def test_stall_unknown_counts_neither_way() -> None:
    got = ask(policy.stall(2), steady(500, -1, -1, -1, 600, 700))
    assert [v.decision for v in got] == [C, C, C, C, C, S]
    assert got[1].reason == "dirty count unknown: not counted"
    # Never known: only the backstop stops it.
    assert decisions(policy.stall(2, max_iters=4), steady(-1, -1, -1, -1, -1)) == [C, C, C, S]


def test_stall_needs_a_round() -> None:
    with pytest.raises(ValueError, match="at least 1 round"):
        policy.stall(0)


# ----------------------------------------------------------------- ramp


def ramp() -> Policy:
    """100 ms for rounds 1-2, 200 ms for 3-4, the ceiling 250 ms for 5-6."""
    return policy.downtime_ramp(0.100, 0.100, 2, 0.250)


def test_ramp_raises_the_target_then_aborts_at_the_ceiling() -> None:
    got = ask(ramp(), steady(900, 300, 280, 260, 255, 251, 251, 10))
    assert [v.decision for v in got] == [C, C, C, C, C, C, A]
    assert [v.reason for v in got] == [
        "no round measured yet: not yet within target 100 ms",
        "predicted downtime 300 ms > target 100 ms",
        "predicted downtime 280 ms > target 200 ms",
        "predicted downtime 260 ms > target 200 ms",
        "predicted downtime 255 ms > target 250 ms",  # the last step, cut to the ceiling
        "predicted downtime 251 ms > target 250 ms",
        "predicted downtime 251 ms, not within the ceiling 250 ms after 2 rounds at it: "
        "not converging",
    ]


def test_ramp_stops_as_soon_as_a_step_is_met() -> None:
    got = ask(ramp(), steady(900, 300, 200))
    assert got[-1] == Verdict(S, "predicted downtime 200 ms <= target 200 ms")
    assert ask(ramp(), steady(900, 300, 280, 260, 255, 240))[-1] == Verdict(
        S, "predicted downtime 240 ms <= target 250 ms"
    )
    # Past the ceiling's rounds, a prediction within it still stops rather than aborts.
    late = steady(900, 300, 280, 260, 255, 251, 250)
    assert as_verdict(ramp()(late[-1])).decision == S
    assert ask(ramp(), steady(0)) == [Verdict(S, "nothing is dirty")]


def test_ramp_reads_the_round_number_not_its_history() -> None:
    rounds = steady(900, 300, 280, 260, 255, 251, 251)
    fresh = [as_verdict(ramp()(st)) for st in rounds]  # each asked once, by a new ramp
    assert fresh == ask(ramp(), rounds)


def test_ramp_never_counted_aborts_a_step_later() -> None:
    """No dirty count never aborts at once (libxc asks once a round without
    one), until a further EVERY rounds past the ceiling have brought none."""
    got = ask(ramp(), steady(*[-1] * 10))
    assert [v.decision for v in got] == [C] * 8 + [A]
    assert got[0].reason == "dirty count unknown: not yet within target 100 ms"
    assert got[-1].reason.startswith("dirty count unknown, not within the ceiling 250 ms")


@pytest.mark.parametrize(
    "args",
    [(0.3, 0.1, 1, 0.2), (0.1, 0.0, 1, 0.2), (0.1, 0.1, 0, 0.2), (-0.1, 0.1, 1, 0.2)],
    ids=["start-over-ceiling", "no-step", "every-0", "negative"],
)
def test_ramp_refuses_a_ramp_that_is_none(args: tuple[float, float, int, float]) -> None:
    with pytest.raises(ValueError, match="a ramp needs"):
        policy.downtime_ramp(*args)


def test_ramp_steps_land_on_the_ceiling() -> None:
    """(1.0 - 0.7) / 0.1 is 3.0000000000000004 in floating point: the ceiling
    is still reached in three steps, and held for EVERY rounds, not two."""
    pol = policy.downtime_ramp(0.7, 0.1, 1, 1.0)
    got = ask(pol, steady(*[5000] * 6))
    assert [v.decision for v in got] == [C, C, C, C, A]
    assert got[3].reason == "predicted downtime 5000 ms > target 1000 ms"


def test_ramp_start_at_the_ceiling() -> None:
    pol = policy.downtime_ramp(0.1, 0.05, 2, 0.1)
    assert decisions(pol, steady(900, 300, 300, 300)) == [C, C, A]


# ----------------------------------------------------------------- guarantee


def always(v: Verdict) -> Policy:
    return lambda st: v


def test_guarantee_lets_a_stop_within_the_bound_stand() -> None:
    st = steady(900, 250)[1]  # 250 ms
    stop = Verdict(S, "inner says stop")
    assert as_verdict(policy.guarantee(0.3, always(stop))(st)) == stop
    assert as_verdict(policy.guarantee(0.25, always(stop))(st)) == stop  # "under": at most


def test_guarantee_turns_a_stop_over_the_bound_into_an_abort() -> None:
    st = steady(900, 400)[1]
    got = as_verdict(policy.guarantee(0.3, always(Verdict(S, "3 rounds done")))(st))
    assert got == Verdict(A, "3 rounds done, but predicted downtime 400 ms > guaranteed 300 ms")
    bare = as_verdict(policy.guarantee(0.3, lambda st: Decision.STOP_AND_COPY)(st))
    assert bare == Verdict(A, "predicted downtime 400 ms > guaranteed 300 ms")


def test_guarantee_passes_continue_abort_and_throttle_through() -> None:
    st = steady(900, 400)[1]
    going = Verdict(C, "on", throttle=30)
    assert as_verdict(policy.guarantee(0.3, always(going))(st)) == going
    no = Verdict(A, "inner gave up")
    assert as_verdict(policy.guarantee(0.3, always(no))(st)) == no


def test_guarantee_nothing_dirty_is_nothing_to_copy() -> None:
    stop = Verdict(S, "0 dirty < 50")
    for st in steady(0):  # not even a rate measured
        assert as_verdict(policy.guarantee(0.0, always(stop))(st)) == stop


def test_guarantee_measures_one_round_before_it_can_say() -> None:
    """Asked first (no send rate yet), a stop is put off once, to measure."""
    first = steady(40)[0]
    pol = policy.guarantee(0.3, always(Verdict(S, "40 dirty < 50", throttle=10)))
    once = as_verdict(pol(first))
    assert once == Verdict(
        C, "40 dirty < 50, but no round measured yet: one more to check the downtime <= 300 ms", 10
    )
    again = as_verdict(pol(first))  # never put off twice: no endless precopy
    assert again == Verdict(
        A, "40 dirty < 50, but the send rate is unknown: a downtime <= 300 ms cannot be guaranteed"
    )


def test_guarantee_waits_one_question_for_a_dirty_count() -> None:
    st = steady(900, -1)[1]
    pol = policy.guarantee(0.3, always(Verdict(S, "stop")))
    assert as_verdict(pol(st)) == Verdict(
        C, "stop, but no dirty count: the next question has it (downtime <= 300 ms?)"
    )
    assert as_verdict(pol(st)) == Verdict(  # twice in a row: never known
        A, "stop, but the dirty count is unknown: a downtime <= 300 ms cannot be guaranteed"
    )


def test_guarantee_around_xens_default() -> None:
    """The 2014 request: Xen's 5 rounds / 50 pages, but never a suspend longer than D."""
    fine = ask(policy.guarantee(0.3), steady(40, 30))
    assert [v.decision for v in fine] == [C, S]
    assert fine[-1].reason == "30 dirty < 50"
    busy = ask(policy.guarantee(0.3), steady(5000, 5000, 5000, 5000, 5000))
    assert [v.decision for v in busy] == [C] * 4 + [A]
    assert busy[-1].reason == "5 rounds done, but predicted downtime 5000 ms > guaranteed 300 ms"


# ----------------------------------------------------------------- libxc's questions


def libxc(*dirty: int, pages: int = 10_000) -> list[PrecopyStats]:
    """The questions libxc (the xen backend) asks, on a link of 1000
    pages/s: before round 0 with every page dirty, then after each pass
    with dirty_count -1 and again, once it has read the log, with the count
    (the next pass sends it)."""
    c = Curve()
    out = [c.add(PrecopyStats(0, 0, pages), 0.0)]
    t, written, to_send = 0.0, 0, pages
    for x, d in enumerate(dirty, 1):
        t += to_send / 1000
        written += to_send
        out.append(c.add(PrecopyStats(x, written, -1), t))
        out.append(c.add(PrecopyStats(x, written, d), t))  # the log is read at once
        to_send = d
    return out


def test_curve_measures_libxcs_rounds_between_counted_questions() -> None:
    qs = libxc(5000, 400)
    assert [q.dirty_count for q in qs] == [10_000, -1, 5000, -1, 400]
    for q in qs[1:]:  # each measured from the last question with a count
        assert q.send_rate == pytest.approx(1000.0)
    assert qs[1].predicted_downtime_s is None
    assert qs[2].predicted_downtime_s == pytest.approx(5.0)
    assert qs[4].predicted_downtime_s == pytest.approx(0.4)
    assert qs[4].round_s == pytest.approx(5.0)  # the pass of 5000 pages


def test_guarantee_on_libxcs_questions() -> None:
    """Xen's default stops on the question without a count (5 rounds done):
    the guarantee decides on the next one, which has it."""
    fine = ask(policy.guarantee(0.3), libxc(5000, 200, 100, 80, 60))
    assert [v.decision for v in fine] == [C] * 10 + [S]
    assert fine[-2].reason.startswith("5 rounds done, but no dirty count: the next question")
    assert fine[-1].reason == "5 rounds done"
    busy = ask(policy.guarantee(0.3), libxc(*[5000] * 5))
    assert [v.decision for v in busy] == [C] * 10 + [A]
    assert busy[-1].reason == "5 rounds done, but predicted downtime 5000 ms > guaranteed 300 ms"


def test_ramp_and_stall_on_libxcs_questions() -> None:
    # Round 7 is past the ceiling's rounds: its question without a count
    # does not abort, its count (240 ms, within the ceiling) stops.
    got = ask(ramp(), libxc(900, 300, 280, 260, 255, 251, 240))
    assert [v.decision for v in got] == [C] * 14 + [S]
    assert ask(ramp(), libxc(900, 300, 280, 260, 255, 251, 251))[-1].decision == A
    assert decisions(policy.stall(2), libxc(500, 400, 450, 460)) == [C] * 8 + [S]


# ----------------------------------------------------------------- composition


def test_first_of_keeps_the_first_reason_to_go_on() -> None:
    def pol() -> Policy:
        return policy.first_of(policy.stall(2), policy.downtime_target(0.1))

    got = ask(pol(), steady(900, 500, 600, 650))
    assert [v.decision for v in got] == [C, C, C, S]
    assert got[1].reason == "500 dirty: a new low"  # the first policy's
    assert got[-1].reason == "stalled: 650 dirty, no new low for 2 rounds (low 500 at round 2)"
    # The second policy's stop wins over the first's continue.
    assert ask(pol(), steady(900, 50))[-1] == Verdict(
        S, "predicted downtime 50 ms <= target 100 ms"
    )


def test_guarantee_and_a_throttle_compose_either_way() -> None:
    """Wrapped in or around a throttling wrapper (auto-converge's shape), the
    guarantee keeps the throttle while going on, and still aborts."""
    curve = steady(5000, 4000, 3000, 3000, 3000)
    inside = policy.guarantee(1.0, passthrough_throttle(policy.stall(2), 20))
    outside = passthrough_throttle(policy.guarantee(1.0, policy.stall(2)), 20)
    for pol in (inside, outside):
        got = ask(pol, curve)
        assert [v.decision for v in got] == [C, C, C, C, A]
        assert [v.throttle for v in got[:4]] == [20] * 4
        assert got[-1].reason.endswith("predicted downtime 3000 ms > guaranteed 1000 ms")


# ----------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    ("text", "equivalent", "curve"),
    [
        ("xen", policy.xen_default, (900, 800, 700, 600, 500, 400)),
        ("xen:3:10", lambda: policy.xen_default(3, 10), (900, 800, 700)),
        ("xen:2", lambda: policy.xen_default(2), (900, 800, 700)),
        ("max-iters:2", lambda: policy.max_iterations(2), (900, 800, 700)),
        ("downtime:250", lambda: policy.downtime_target(0.25), (900, 300, 250)),
        ("downtime:2.5", lambda: policy.downtime_target(0.0025), (900, 300, 2)),
        ("stall:2", lambda: policy.stall(2), (900, 800, 850, 860)),
        ("stall:2:3", lambda: policy.stall(2, max_iters=3), (900, 800, 700, 600)),
        (
            "ramp:100:100:2:250",
            lambda: policy.downtime_ramp(0.1, 0.1, 2, 0.25),
            (900, 300, 280, 260, 255, 251, 251),
        ),
        (
            "converge",
            lambda: policy.first_of(policy.abort_if_not_converging(), policy.xen_default()),
            (900, 900, 900, 900, 900),
        ),
        ("guarantee:300", lambda: policy.guarantee(0.3), (5000,) * 5),
        (
            "guarantee:300+stall:2+max-iters:4",
            lambda: policy.guarantee(
                0.3, policy.first_of(policy.stall(2), policy.max_iterations(4))
            ),
            (900, 800, 200, 100),
        ),
        (
            "guarantee:500+guarantee:300+downtime:400",
            lambda: policy.guarantee(0.5, policy.guarantee(0.3, policy.downtime_target(0.4))),
            (900, 800, 350),
        ),
    ],
)
def test_grammar_builds_the_policy_it_names(
    text: str, equivalent: Callable[[], Policy], curve: tuple[int, ...]
) -> None:
    spec = cli.parse_policy_spec(text)
    assert spec.text == text
    rounds = steady(*curve)
    assert ask(spec.make(), rounds) == ask(equivalent(), rounds)


def test_grammar_abort() -> None:
    assert ask(policy.parse("abort").make(), steady(5)) == [Verdict(A, "always abort")]


def test_spec_makes_a_fresh_policy_each_time() -> None:
    """A policy keeps its history: two saves with one spec must not share it."""
    spec = cli.parse_policy_spec("stall:2")
    rounds = steady(900, 950, 960)
    first = spec.make()
    assert decisions(first, rounds) == [C, C, S]
    assert decisions(spec.make(), rounds) == [C, C, S]  # not stopped at once by first's count
    assert spec.make() is not spec.make()
    assert decisions(cli.parse_policy("stall:2"), rounds) == [C, C, S]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "an empty term"),
        ("stall:2+", "an empty term"),
        ("+stall:2", "an empty term"),
        ("bogus", "unknown term 'bogus'"),
        ("Stall:2", "unknown term 'Stall'"),
        ("stall", "'stall' is stall:K[:MAX_ITERS]"),
        ("stall:0", "stall's K must be at least 1"),
        ("stall:x", "K must be a whole number, not 'x'"),
        ("stall:1:2:3", "'stall' is stall:K[:MAX_ITERS]"),
        ("stall:-3", "K must be a whole number, not '-3'"),
        ("stall:+3", "K must be a whole number, not ''"),  # '+' joins terms
        ("stall: 3", "K must be a whole number, not ' 3'"),
        ("stall:3_0", "K must be a whole number"),
        ("stall:\u0663", "K must be a whole number"),  # an Arabic-Indic three
        ("stall:" + "9" * 40, "K must be a whole number"),
        ("max-iters", "'max-iters' is max-iters:N"),
        ("max-iters:-1", "N must be a whole number"),
        ("xen:1:2:3", "'xen' is xen[:ITERS[:THRESHOLD]]"),
        ("downtime:-5", "MS must be milliseconds"),
        ("downtime:nan", "MS must be milliseconds"),
        ("downtime:inf", "MS must be milliseconds"),
        ("downtime:1e3", "MS must be milliseconds"),
        ("downtime:.5", "MS must be milliseconds"),
        ("ramp:1:2:3", "'ramp' is ramp:START_MS:STEP_MS:EVERY:CEILING_MS"),
        ("ramp:500:50:2:100", "a ramp needs 0 <= START <= CEILING"),
        ("ramp:50:0:2:100", "STEP > 0"),
        ("ramp:50:50:0:100", "EVERY >= 1"),
        ("guarantee", "'guarantee' is guarantee:MS"),
        ("guarantee:x+xen", "MS must be milliseconds"),
        ("stall:2+guarantee:300", "guarantee must come before the policies it wraps"),
        ("abort:1", "'abort' is abort, without arguments"),
        ("converge:3", "'converge' is converge, without arguments"),
        ("xen+" * 200 + "xen", "longer than 512 characters"),
    ],
)
def test_grammar_refuses_bad_text_saying_what(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        policy.parse(text)
    with pytest.raises(argparse.ArgumentTypeError) as ae:
        cli.parse_policy_spec(text)
    line = str(ae.value)
    assert "\n" not in line
    assert line.startswith("bad policy ") and says in line
    assert line.endswith(f"expected {policy.GRAMMAR}")
    assert len(line) < 200 + len(policy.GRAMMAR) + len(says)  # a bomb is not echoed whole


# ----------------------------------------------------------------- explanations


def event(**kw: object) -> PolicyEvent:
    fields: dict[str, object] = {
        "op": "save",
        "domain": "d",
        "iteration": 3,
        "total_written": 20000,
        "dirty_count": 1200,
        "decision": 0,
    }
    return PolicyEvent(**(fields | kw))  # type: ignore[arg-type]


#: A round's measurements, as the supervisor's Curve gives them.
MEASURED: dict[str, object] = {
    "elapsed": 1.25,
    "round_s": 0.5,
    "sent": 15000,
    "send_rate": 30000.04,
    "dirty_rate": 2400.4,
    "predicted_downtime_s": 0.0400004,
}


def test_progress_line_explains_a_round() -> None:
    measured = event(
        **MEASURED,
        decision=1,
        reason="stalled: 1200 dirty, no new low for 2 rounds (low 1100 at round 1)",
        throttle=20,
    )
    assert policy_line(measured) == (
        "round 3: 1200 dirty, 20000 written, sent 30000 pages/s, dirtied 2400 pages/s, "
        "downtime ~40 ms -> stop-and-copy: stalled: 1200 dirty, no new low for 2 rounds "
        "(low 1100 at round 1) [throttle 20%]"
    )
    first = event(iteration=1, dirty_count=-1, reason="round 1 of 3")
    assert policy_line(first) == (
        "round 1: dirty unknown, 20000 written, nothing measured yet -> continue: round 1 of 3"
    )
    unknown = event(round_s=0.5, send_rate=0.0, decision=-1)
    assert policy_line(unknown).endswith("downtime unknown -> abort")
    after_a_pass = event(dirty_count=-1, round_s=0.5, send_rate=30000.0)  # libxc's first question
    assert policy_line(after_a_pass) == (
        "round 3: dirty unknown, 20000 written, sent 30000 pages/s, downtime unknown -> continue"
    )


def test_plain_progress_writes_the_line(tmp_path: Path) -> None:
    with (tmp_path / "progress").open("w+") as out, Renderer("plain", out) as rend:
        rend(event(reason="on"))
        out.seek(0)
        assert out.read() == "save d: " + policy_line(event(reason="on")) + "\n"


def test_json_round_carries_the_decision() -> None:
    ev = event(**MEASURED, decision=-1, reason="why")
    assert policy_round(ev) == {
        "iteration": 3,
        "total_written": 20000,
        "dirty_count": 1200,
        "elapsed_s": 1.25,
        "round_s": 0.5,
        "sent": 15000,
        "send_rate": 30000.0,
        "dirty_rate": 2400.4,
        "predicted_downtime_ms": 40.0,
        "decision": "abort",
        "reason": "why",
        "throttle": None,
    }
    assert policy_round(event())["predicted_downtime_ms"] is None


# ----------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    "argv",
    [
        ["save", "--sim", "d", "{out}", "--live", "--policy", "{bad}"],
        ["migrate", "--sim", "d", "--to", "127.0.0.1:9", "--insecure", "--policy", "{bad}"],
    ],
    ids=["save", "migrate"],
)
@pytest.mark.parametrize("bad", ["stall:0", "guarantee:1e9+xen", "x" * 5000])
def test_cli_bad_policy_is_a_usage_error(
    argv: list[str], bad: str, tmp_path: Path, sim_env: dict[str, str]
) -> None:
    out = tmp_path / "out"
    r = xcsave_cli(*(a.format(out=out, bad=bad) for a in argv), env=sim_env)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "argument --policy: bad policy " in last
    assert last.endswith(policy.GRAMMAR)
    assert len(last) < 600
    assert not out.exists()


def test_cli_live_save_explains_every_round(tmp_path: Path, sim_env: dict[str, str]) -> None:
    """``--json`` carries each round with its decision and reason, and
    ``--progress plain`` says the same, one line a round."""
    dom = Path(sim_env["XCSAVE_SIM_DIR"]) / "d"
    dom.parent.mkdir()
    sim.create(dom, 16 * MiB, seed=5)
    out = tmp_path / "out"
    r = xcsave_cli(
        "save", "--sim", dom, out, "--live", "--policy", "guarantee:1000+max-iters:3",
        "--json", "--progress", "plain",
        env=sim_env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    rounds = doc["precopy_rounds"]
    assert [x["iteration"] for x in rounds] == [1, 2, 3]
    assert [x["decision"] for x in rounds] == ["continue", "continue", "stop-and-copy"]
    assert [x["reason"] for x in rounds] == ["round 1 of 3", "round 2 of 3", "3 rounds done"]
    for x in rounds:
        assert set(x) == {
            "iteration", "total_written", "dirty_count", "elapsed_s", "round_s", "sent",
            "send_rate", "dirty_rate", "predicted_downtime_ms", "decision", "reason", "throttle",
        }  # fmt: skip
    assert doc["stats"]["rounds"] == len(rounds) + 1  # round 0 is not asked about
    lines = [ln for ln in r.stderr.splitlines() if ": round " in ln]
    assert len(lines) == 3
    for ln, x in zip(lines, rounds, strict=True):
        assert f"round {x['iteration']}: " in ln
        assert ln.endswith(f"-> {x['decision']}: {x['reason']}")


def test_cli_policy_abort_says_why(tmp_path: Path, sim_env: dict[str, str]) -> None:
    dom = Path(sim_env["XCSAVE_SIM_DIR"]) / "d"
    dom.parent.mkdir()
    sim.create(dom, 4 * MiB, seed=5)
    out = tmp_path / "out"
    r = xcsave_cli("save", "--sim", dom, out, "--live", "--policy", "abort", env=sim_env)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "ECANCELED" in r.stderr
    assert "aborted by the precopy policy (always abort): " in r.stderr
    assert not out.exists()
    assert sim.info(dom)["state"] == "running"
