"""Verify and restore read one walker (csrc/core/walker.c): they refuse the
same mutated streams.

The hostile corpus's mutations (tests/test_hostile.py: truncations at every
record edge and inside every field, single-bit flips of the structure, the
crafted and wrapped field values) go through ``streamtools.verify`` and a sim
restore through the helper.  A stream verify calls invalid is one restore
refuses, and the other way round, except where one of them is stricter by
design, each named below with the words of its own rule:

- verify only: zero padding, a pfn twice in one batch, the guest type's
  mandatory records and bytes after the outermost END -- the verifier's
  extra strictness (XCS_WALK_PADDING, _DUPS, _MANDATORY, _TRAILING); Xen's
  restorer does not look either, and a restore reads exactly the stream;
- restore only: what the sim engine makes of the stream's content, which
  the verifier does not interpret (the sim record in HVM_CONTEXT, the
  domain's shape and its pfn range, the engine's page cap) and the engine's
  own size limits (a batch of at most 1024 pfns, the xl config's 16 MiB, a
  libxl record's 128 MiB).

A refusal on one side that matches none of these is the two parsers
drifting apart: the test names the stream, the field and both verdicts.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import test_hostile as hostile

from xcsave import streamtools

#: The verifier's own strictness: restore accepts these (test_hostile's
#: crafted cases "non-zero-padding", "pfn-dup-in-batch", "bytes-after-end").
VERIFY_ONLY = re.compile(
    r"padding containing non-zero bytes|duplicate pfn|lacks (the|a) mandatory"
    r"|bytes after END"
)

#: The sim engine's semantics and limits: verify accepts these.
RESTORE_ONLY = re.compile(
    r"HVM_CONTEXT at offset \d+: |out of range \(domain has|the stream's domain has"
    r"|without HVM_CONTEXT|checkpoint \d+ without|domain type \d+: the sim engine"
    r"|batch of \d+ pages \(must be 1\.\.1024\)|xl optional data of \d+ bytes exceeds"
    r"|record length \d+ exceeds|xl savefile carries a legacy"
)

MAX_PAGES = 4096  # as test_hostile's flips: a flip may not grow the domain to GiB


def _verify(tmp: Path, data: bytes, fmt: str) -> tuple[bool, str]:
    path = tmp / "verify.in"
    path.write_bytes(data)
    try:
        r = streamtools.verify(path, fmt, "plain")
    finally:
        path.unlink()
    return r.valid, r.message


def _mutations(s: hostile.SimStream) -> list[tuple[str, bytes]]:
    """Truncations at every cut point and flips of every structural field."""
    fields = hostile.walk(s.data, s.fmt)
    cuts = [(f"cut@{c}", s.data[:c]) for c in hostile.cut_points(s.data, fields)]
    bits = hostile.flip_sample(s.data, hostile.CI_FLIPS, seed=13, fields=fields)
    flips = []
    for b in bits:
        f = hostile.field_at(fields, b // 8)
        flips.append((f"bit{b} ({f.layer} {f.record}/{f.part})", hostile.flip(s.data, b)))
    return cuts + flips


def _disagreements(tmp: Path, cases: list[tuple[str, bytes, str]], target: Path) -> list[str]:
    """Each case through verify and restore; the disagreements no rule explains."""
    verdicts = [_verify(tmp, data, fmt) for _, data, fmt in cases]
    outcomes = []
    with hostile.helper_as_limit():
        for fmt in sorted({fmt for _, _, fmt in cases}):
            idx = [i for i, c in enumerate(cases) if c[2] == fmt]
            outs = hostile.restore_many(
                [cases[i][1] for i in idx], target, fmt=fmt, max_pages=MAX_PAGES
            )
            outcomes.extend(zip(idx, outs, strict=True))
    by_index = dict(outcomes)
    drift = []
    for i, (name, _, fmt) in enumerate(cases):
        (valid, why), o = verdicts[i], by_index[i]
        if valid == o.accepted:
            continue
        if not valid and VERIFY_ONLY.search(why):
            continue
        if valid and RESTORE_ONLY.search(o.message):
            continue
        drift.append(
            f"{fmt} {name}: verify says {'valid' if valid else why!r}, "
            f"restore {'accepts' if o.accepted else 'refuses: ' + repr(o.message)}"
        )
    return drift


@pytest.mark.parametrize("name", hostile.SIM_FORMATS)
def test_verify_and_restore_refuse_the_same_mutations(
    name: str, sim_streams: dict[str, hostile.SimStream], tmp_path: Path
) -> None:
    s = sim_streams[name]
    cases = [(n, d, s.fmt) for n, d in _mutations(s)]
    assert len(cases) > 50
    assert _disagreements(tmp_path, cases, tmp_path / "target.dom") == []


def test_verify_and_restore_refuse_the_same_crafted_fields(
    sim_streams: dict[str, hostile.SimStream], tmp_path: Path
) -> None:
    crafted = [(n, d, "libxc") for n, d, _, _ in hostile.crafted_cases(sim_streams["libxc"].data)]
    wrapped = [(n, d, fmt) for n, d, fmt, _ in hostile.wrapped_cases(sim_streams)]
    assert _disagreements(tmp_path, crafted + wrapped, tmp_path / "target.dom") == []


def test_the_allowed_differences_are_real(
    sim_streams: dict[str, hostile.SimStream], tmp_path: Path
) -> None:
    """Each exception above is one the corpus shows: a rule that never fires
    would hide drift, so every pattern must explain at least one case."""
    crafted = {n: d for n, d, _, _ in hostile.crafted_cases(sim_streams["libxc"].data)}
    for name in ("non-zero-padding", "pfn-dup-in-batch", "bytes-after-end"):
        valid, why = _verify(tmp_path, crafted[name], "libxc")
        assert not valid and VERIFY_ONLY.search(why), (name, why)
    for name in ("pages-below-sent", "vcpus-0", "pfn-out-of-domain"):
        valid, _ = _verify(tmp_path, crafted[name], "libxc")
        (o,) = hostile.restore_many([crafted[name]], tmp_path / "target.dom", fmt="libxc")
        assert valid and not o.accepted and RESTORE_ONLY.search(o.message), (name, o)


@pytest.fixture(scope="module")
def sim_streams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, hostile.SimStream]:
    return hostile.build_sim_streams(tmp_path_factory.mktemp("codec-src"))
