"""The champion gate: which checks pass, which fail, and what they say."""

from __future__ import annotations

from refinery.params import GateParams
from refinery.registry import Candidate, decide

GATE = GateParams(min_accuracy=0.8, max_drop_vs_teacher=0.05, max_latency_ms=10.0)


def test_gate_accepts_a_good_first_candidate() -> None:
    decision = decide(Candidate(0.9, 2.0, 0.92), GATE, champion_accuracy=None)
    assert decision.promote
    assert all(reason.startswith("pass") for reason in decision.reasons)
    assert "no current champion" in decision.reasons[-1]


def test_gate_refuses_each_failed_check_and_names_it() -> None:
    cases = {
        "min_accuracy": Candidate(0.7, 2.0, 0.72),
        "max_drop_vs_teacher": Candidate(0.85, 2.0, 0.95),
        "max_latency_ms": Candidate(0.9, 25.0, 0.91),
    }
    for key, candidate in cases.items():
        decision = decide(candidate, GATE, champion_accuracy=None)
        assert not decision.promote
        failed = [r for r in decision.reasons if r.startswith("FAIL")]
        assert len(failed) == 1 and key in failed[0], decision.reasons


def test_gate_needs_to_beat_the_champion() -> None:
    assert not decide(Candidate(0.9, 2.0, 0.92), GATE, 0.9, "3").promote
    refused = decide(Candidate(0.9, 2.0, 0.92), GATE, 0.95, "3")
    assert "does not beat champion v3" in refused.reasons[-1]
    assert refused.previous_champion == "3"
    assert decide(Candidate(0.96, 2.0, 0.97), GATE, 0.95, "3").promote
