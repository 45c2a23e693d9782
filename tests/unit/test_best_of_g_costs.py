"""The best-of-G strategies: the parser's one error per bad string, and each strategy's cost in
denoiser evaluations (docs/integrations.md). Needs neither diffusers nor a service."""

from __future__ import annotations

import pytest

from latentsieve.integrations.diffusers import Strategy, parse_strategy


@pytest.mark.parametrize(("text", "kind", "steps"), [
    ("noise", "noise", None),
    ("final", "final", None),
    ("prefix:10", "prefix", 10),
    ("preview:1", "preview", 1),
    (" prefix: 20 ", "prefix", 20),
])
def test_strategies_parse_and_print_back(text: str, kind: str, steps: int | None) -> None:
    strategy = parse_strategy(text)
    assert (strategy.kind, strategy.steps) == (kind, steps)
    assert parse_strategy(str(strategy)) == strategy


@pytest.mark.parametrize(("text", "message"), [
    ("best", "unknown strategy 'best'; use noise, prefix:K"),
    ("", "unknown strategy ''"),
    ("Prefix:3", "unknown strategy 'Prefix:3'"),
    ("prefix", "strategy prefix:K needs a whole number K >= 1, got None"),
    ("prefix:0", "strategy prefix:K needs a whole number K >= 1, got 0"),
    ("prefix:-2", "needs a whole number K >= 1, got -2"),
    ("preview:0", "strategy preview:S needs a whole number S >= 1, got 0"),
    ("preview:2.5", "strategy 'preview:2.5': '2.5' is not a whole number"),
    ("preview:", "strategy 'preview:': '' is not a whole number"),
    ("noise:3", "strategy 'noise' takes no step count"),
    ("final:25", "strategy 'final' takes no step count"),
])
def test_a_bad_strategy_is_one_value_error(text: str, message: str) -> None:
    with pytest.raises(ValueError) as bad:
        parse_strategy(text)
    assert message in str(bad.value)
    assert "noise, prefix:K (1 <= K < T), preview:S (S >= 1) or final" in str(bad.value)


def test_strategies_built_directly_are_checked_too() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'random'"):
        Strategy("random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="whole number K >= 1, got True"):
        Strategy("prefix", True)
    with pytest.raises(ValueError, match="takes no step count"):
        Strategy("final", 3)


def test_prefix_needs_k_below_t() -> None:
    Strategy("prefix", 24).check_steps(25)
    for k in (25, 26):
        with pytest.raises(ValueError, match=f"K = {k} must be below the T = 25 inference steps"):
            Strategy("prefix", k).check_steps(25)
    # A preview may be as long as the run (pointless, but well defined); the others have no K.
    for strategy in ("preview:30", "noise", "final"):
        parse_strategy(strategy).check_steps(25)


@pytest.mark.parametrize(("text", "formula"), [
    ("noise", lambda g, m, t: m * t),
    ("prefix:10", lambda g, m, t: g * 10 + m * (t - 10)),
    ("preview:10", lambda g, m, t: g * 10 + m * t),
    ("final", lambda g, m, t: g * t),
])
def test_costs_are_the_documented_formulas(text: str, formula: object) -> None:
    strategy = parse_strategy(text)
    for g, m, t in [(16, 4, 25), (4, 4, 25), (64, 1, 50), (8, 0, 20)]:
        assert strategy.evaluations(g, m, t) == formula(g, m, t)  # type: ignore[operator]


def test_cost_table_of_the_docs() -> None:
    """docs/integrations.md's worked example: G = 16, M = 4, T = 25 (plain rendering: 100)."""
    costs = {text: parse_strategy(text).evaluations(16, 4, 25)
             for text in ("noise", "prefix:10", "prefix:20", "preview:5", "preview:10", "final")}
    assert costs == {"noise": 100, "prefix:10": 220, "prefix:20": 340, "preview:5": 180,
                     "preview:10": 260, "final": 400}
