"""Choosing a setting without looking at the number it is judged by: leave-one-out selection.

A constant tuned on the sets it is then reported on overstates how it does on data it has never seen
(issue 27: re-ranking weights chosen on the reported sets lost on an unseen aerial set). Leave-one-out
answers the honest question — *had this set been unseen, which setting would the others have chosen,
and how would it have done here?* — by choosing, for each held-out set, the setting that maximises an
objective over the **other** sets only, so the held-out set's own score can never influence its choice.

The table is ``scores[set][setting]``: any score where higher is better (the re-ranking benchmark uses
ΔR@1 against the global ranking). An objective maps one setting's scores over the training sets to a
sortable key (higher is better); ties go to the setting listed first, so list the simplest or current
setting first to prefer it. Two robust objectives are provided:

- :func:`worst_then_mean`: the worst case over the training sets, ties by the mean — never-lose first;
- :func:`mean_above_floor`: the best mean among settings whose worst case stays at or above a floor
  (e.g. −0.005 ΔR@1, inside the issue's −0.01 target), and the best worst case when none does — gains
  count once the floor is safe, so a setting that gains everywhere but one set by a hair is not
  rejected in favour of doing nothing.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Hashable, Mapping, Sequence, TypeVar

import numpy as np

from ..errors import ConfigError

Setting = TypeVar("Setting", bound=Hashable)
Objective = Callable[[Sequence[float]], tuple]
# Scores are differences of recalls (multiples of 1/queries) computed in floating point: keys are rounded
# to this many decimals so that equal recalls tie exactly and the listed order decides, not rounding noise.
KEY_DECIMALS = 9


def _key(*values: float) -> tuple[float, ...]:
    return tuple(round(float(v), KEY_DECIMALS) for v in values)


def worst_then_mean(values: Sequence[float]) -> tuple:
    """Key of the worst case, then the mean: the setting that loses least on its worst training set."""
    v = np.asarray(values, np.float64)
    return _key(v.min(), v.mean())


def mean_above_floor(floor: float) -> Objective:
    """An objective: settings whose worst training score is ≥ ``floor`` rank above all others, by mean
    (then worst case); below the floor, by worst case (then mean) — the safest when nothing is safe."""

    def objective(values: Sequence[float]) -> tuple:
        v = np.asarray(values, np.float64)
        worst, mean = round(float(v.min()), KEY_DECIMALS), float(v.mean())
        if worst >= floor:
            return (1, *_key(mean, worst))
        return (0, *_key(worst, mean))

    objective.__name__ = f"mean_above_floor({floor:g})"
    return objective


def _settings(scores: Mapping[Hashable, Mapping[Setting, float]]) -> list[Setting]:
    """The settings every set was scored with, in the first set's order; a ragged table is refused."""
    if len(scores) < 2:
        raise ConfigError(f"leave-one-out needs at least two sets, got {len(scores)}")
    sets = list(scores)
    settings = list(scores[sets[0]])
    if not settings:
        raise ConfigError(f"set {sets[0]!r} has no scored settings")
    for s in sets[1:]:
        if set(scores[s]) != set(settings):
            missing = set(settings) ^ set(scores[s])
            raise ConfigError(f"set {s!r} was not scored with the same settings as {sets[0]!r} (differ: {missing})")
    return settings


def best_setting(
    scores: Mapping[Hashable, Mapping[Setting, float]], objective: Objective, sets: Sequence[Hashable]
) -> Setting:
    """The setting maximising ``objective`` over ``sets`` (ties: the first listed)."""
    settings = _settings(scores)
    if not sets:
        raise ConfigError("choosing a setting needs at least one set to judge it on")
    keys = [objective([scores[s][setting] for s in sets]) for setting in settings]
    return settings[max(range(len(settings)), key=lambda i: (keys[i], -i))]


def leave_one_out_choice(
    scores: Mapping[Hashable, Mapping[Setting, float]],
    objective: Objective,
    groups: Mapping[Hashable, Hashable] | None = None,
) -> dict[Hashable, Setting]:
    """For each set, the setting ``objective`` prefers on all the *other* sets (its own score unseen).

    ``groups`` (set → group, e.g. the dataset a transformed query set was made from): hold out the
    held-out set's whole group, so that sets sharing its map and its queries do not vote for it either
    — leave-one-*dataset*-out. ``None``: each set is its own group."""
    _settings(scores)
    group = {s: s for s in scores} if groups is None else dict(groups)
    missing = [s for s in scores if s not in group]
    if missing:
        raise ConfigError(f"groups has no group for sets {missing}")
    choice = {}
    for held in scores:
        training = [s for s in scores if group[s] != group[held]]
        if not training:
            raise ConfigError(f"holding out {held!r}'s group {group[held]!r} leaves no set to choose on")
        choice[held] = best_setting(scores, objective, training)
    return choice


def most_chosen(
    choices: Mapping[Hashable, Setting], scores: Mapping[Hashable, Mapping[Setting, float]], objective: Objective
) -> Setting:
    """The setting chosen in the most folds — the one to ship — ties broken by ``objective`` over every
    set (then by the listed order). Chosen with every set seen, so its scores are not held out."""
    settings = _settings(scores)
    counts = Counter(choices.values())
    top = max(counts.values())
    tied = [s for s in settings if counts.get(s, 0) == top]
    return best_setting({k: {s: v[s] for s in tied} for k, v in scores.items()}, objective, list(scores))
