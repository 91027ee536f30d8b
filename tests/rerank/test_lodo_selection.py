"""Leave-one-dataset-out selection (vprkit.evaluation.selection), used by benchmarks/bench_rerank_lodo.py to
choose re-ranking constants on the sets a number is not reported on."""

from __future__ import annotations

import pytest

from vprkit.errors import ConfigError
from vprkit.evaluation.selection import (
    best_setting,
    leave_one_out_choice,
    mean_above_floor,
    most_chosen,
    worst_then_mean,
)

# ΔR@1 per held-out set and setting. "bold" gains most on average but loses badly on C; "safe" never loses
# and gains a little; "off" is the global order (0 everywhere).
TABLE = {
    "A": {"off": 0.0, "safe": 0.02, "bold": 0.10},
    "B": {"off": 0.0, "safe": 0.01, "bold": 0.08},
    "C": {"off": 0.0, "safe": 0.00, "bold": -0.20},
    "D": {"off": 0.0, "safe": 0.03, "bold": 0.12},
}


def test_worst_case_objective_picks_the_never_losing_setting_except_where_the_loser_is_held_out():
    choice = leave_one_out_choice(TABLE, worst_then_mean)
    # with C among the training sets bold's worst case is −0.20, so safe wins; with C held out bold's
    # worst case over A, B, D is +0.08 > safe's +0.01
    assert choice == {"A": "safe", "B": "safe", "C": "bold", "D": "safe"}


def test_the_held_out_sets_own_score_never_influences_its_choice():
    choice = leave_one_out_choice(TABLE, worst_then_mean)
    for held in TABLE:
        for setting in TABLE[held]:
            for value in (-1.0, 1.0):
                changed = {s: dict(row) for s, row in TABLE.items()}
                changed[held][setting] = value
                assert leave_one_out_choice(changed, worst_then_mean)[held] == choice[held]


def test_another_sets_score_does_change_the_choice():
    changed = {s: dict(row) for s, row in TABLE.items()}
    changed["C"]["bold"] = 0.05  # bold no longer loses anywhere: chosen for every other fold
    choice = leave_one_out_choice(changed, worst_then_mean)
    assert choice["A"] == choice["B"] == choice["D"] == "bold"


def test_groups_hold_out_the_whole_dataset():
    # A and B are one dataset (say a set and its rotated copy), C and D another: holding out A also hides
    # B, so A's choice is made on C and D alone — where bold loses on C
    groups = {"A": "one", "B": "one", "C": "two", "D": "two"}
    choice = leave_one_out_choice(TABLE, worst_then_mean, groups)
    assert choice == {"A": "safe", "B": "safe", "C": "bold", "D": "bold"}
    # changing anything in A's group leaves A's (and B's) choice alone
    changed = {s: dict(row) for s, row in TABLE.items()}
    changed["B"]["off"] = 5.0
    assert leave_one_out_choice(changed, worst_then_mean, groups)["A"] == "safe"
    with pytest.raises(ConfigError, match="leaves no set"):
        leave_one_out_choice(TABLE, worst_then_mean, dict.fromkeys(TABLE, "all"))
    with pytest.raises(ConfigError, match="no group"):
        leave_one_out_choice(TABLE, worst_then_mean, {"A": "one"})


def test_floor_objective_accepts_a_small_loss_for_a_larger_mean():
    table = {
        "A": {"off": 0.0, "small-loss": 0.06},
        "B": {"off": 0.0, "small-loss": -0.004},
        "C": {"off": 0.0, "small-loss": 0.05},
    }
    assert set(leave_one_out_choice(table, mean_above_floor(-0.005)).values()) == {"small-loss"}
    assert set(leave_one_out_choice(table, worst_then_mean).values()) == {"off", "small-loss"}
    assert leave_one_out_choice(table, worst_then_mean)["C"] == "off"  # A, B: worst −0.004 < 0
    # below the floor everywhere: the safest (best worst case) wins
    assert leave_one_out_choice(table, mean_above_floor(0.01))["A"] == "off"


def test_ties_go_to_the_setting_listed_first():
    table = {"A": {"x": 0.01, "y": 0.01}, "B": {"x": 0.0, "y": 0.0}}
    assert leave_one_out_choice(table, worst_then_mean) == {"A": "x", "B": "x"}
    flipped = {s: {"y": r["y"], "x": r["x"]} for s, r in table.items()}
    assert leave_one_out_choice(flipped, worst_then_mean) == {"A": "y", "B": "y"}
    # rounding noise of a float difference does not break a tie
    noisy = {"A": {"x": 0.3 - 0.2, "y": 0.1}, "B": {"x": 0.0, "y": 0.0}}
    assert best_setting(noisy, worst_then_mean, ["A", "B"]) == "x"


def test_most_chosen_is_the_modal_choice_and_ties_break_by_the_objective_on_every_set():
    choice = leave_one_out_choice(TABLE, worst_then_mean)
    assert most_chosen(choice, TABLE, worst_then_mean) == "safe"
    tied = {"A": "safe", "B": "bold", "C": "off", "D": "off"}
    assert most_chosen(tied, TABLE, worst_then_mean) == "off"
    even = {"A": "safe", "B": "bold", "C": "safe", "D": "bold"}
    assert most_chosen(even, TABLE, worst_then_mean) == "safe"  # worst over all: safe 0.00 > bold −0.20


def test_malformed_tables_are_refused():
    with pytest.raises(ConfigError, match="at least two sets"):
        leave_one_out_choice({"A": {"x": 0.0}}, worst_then_mean)
    with pytest.raises(ConfigError, match="same settings"):
        leave_one_out_choice({"A": {"x": 0.0}, "B": {"y": 0.0}}, worst_then_mean)
