"""Fixtures of the training tests: the tiny recipe most of them train (``recipe_factory``).

The recipe: ``effnet-gem`` (EfficientNet-Lite0) at 64×64 over ``helpers.synchronised_seasons`` images in
``<root>/data`` (summer and winter folders; a frame is a place), frames 0–15 trained on, a monitor on
frames 16–23, a 4-channel layout head, InfoNCE without a miner, 4 places × 2 images a batch, 2 epochs,
seed 0; its feature cache in ``<root>/cache``. Each test changes only the sections it is about.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

import pytest

TINY_RECIPE: dict[str, Any] = {
    "backbone": {"preset": "effnet-gem", "image_size": [64, 64], "memory_budget_mb": 64},
    "data": {"root": "data", "labels": "frames", "folders": ["summer", "winter"], "frames": [0, 16]},
    "validation": {"queries": "winter", "database": "summer"},
    "monitor": {"queries": "winter", "database": "summer", "frames": [16, 24]},
    "head": {"name": "layout", "options": {"out_channels": 4}},
    "loss": {"name": "infonce"},
    "miner": {"name": ""},
    "sampler": {"places": 4, "images_per_place": 2},
    "optimiser": {"lr": 0.005},
    "train": {"epochs": 2, "seed": 0},
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"no TOML for {value!r}")


class RecipeFactory:
    """``factory(root, name=..., out=..., **sections)``: the tiny recipe under ``root``, each given section updated
    with the given settings (``section=None`` drops it); ``factory.write(path, recipe)`` writes it as TOML."""

    def __call__(self, root: Path, name: str = "run", out: str = "run", **sections: Mapping[str, Any] | None) -> dict:
        recipe: dict[str, Any] = {"name": name, "out": str(root / out), "_dir": str(root), **copy.deepcopy(TINY_RECIPE)}
        recipe["backbone"]["cache"] = str(root / "cache")
        for key, settings in sections.items():
            if settings is None:
                recipe.pop(key, None)
            else:
                recipe[key] = {**recipe.get(key, {}), **copy.deepcopy(dict(settings))}
        return recipe

    @staticmethod
    def write(path: Path, recipe: Mapping[str, Any]) -> Path:
        """``recipe`` as a TOML file (what ``load_recipe`` reads; ``_dir`` and None settings left out)."""
        top = [
            f"{k} = {_toml_value(v)}"
            for k, v in recipe.items()
            if not isinstance(v, Mapping) and v is not None and k != "_dir"
        ]
        tables = [
            f"\n[{k}]\n" + "".join(f"{s} = {_toml_value(x)}\n" for s, x in v.items() if x is not None)
            for k, v in recipe.items()
            if isinstance(v, Mapping)
        ]
        path.write_text("\n".join(top) + "\n" + "".join(tables))
        return path


@pytest.fixture(scope="session")
def recipe_factory() -> RecipeFactory:
    """The tiny training recipe (see the module's docstring), changed section by section."""
    return RecipeFactory()
