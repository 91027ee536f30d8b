"""Every section of a training recipe is typed and checked before any work (``vprkit.training.sections``).

A misspelt key used to be ignored (the run went on with the default); now an unknown section or key
is refused with the closest valid key, a wrong type or range names the field, in one line, before a
model is built, an image read or a folder written.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from vprkit.errors import ConfigError
from vprkit.training import preparation
from vprkit.training.recipe import load_recipe, run_recipe, settings_from
from vprkit.training.sections import SECTIONS, check_recipe, recipe_schema, section
from vprkit.training.trainer import TrainSettings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def untouched(monkeypatch):
    """Fails the test if a backbone is built or an image folder listed (the refusal must come first)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the recipe was refused")

    monkeypatch.setattr(preparation, "build_backbone", forbidden)
    monkeypatch.setattr(preparation, "list_images", forbidden)
    monkeypatch.setattr(preparation, "resolve", forbidden)


def _refused(recipe_factory, tmp_path: Path, **sections) -> str:
    """Run the tiny recipe (written as TOML) with ``sections`` changed; the one-line ConfigError's message."""
    recipe = recipe_factory(tmp_path, **sections)
    path = recipe_factory.write(tmp_path / "recipe.toml", recipe)
    with pytest.raises(ConfigError) as e:
        run_recipe(path, progress=False)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing written
    return message.removeprefix(f"{path}: ")


def test_learning_rate_is_refused_naming_lr(recipe_factory, tmp_path, untouched):
    msg = _refused(recipe_factory, tmp_path, optimiser={"learning_rate": 0.01})
    assert msg.startswith("[optimiser] has no setting 'learning_rate' (did you mean 'lr'?)")
    # In another section: the key it means, and the section that has it.
    msg = _refused(recipe_factory, tmp_path, train={"learning_rate": 0.01})
    assert msg.startswith("[train] has no setting 'learning_rate' (did you mean 'lr' in [optimiser]?)")


def test_epoch_is_refused_naming_epochs(recipe_factory, tmp_path, untouched):
    msg = _refused(recipe_factory, tmp_path, train={"epoch": 3})
    assert msg.startswith("[train] has no setting 'epoch' (did you mean 'epochs'?); known: epochs, ")


def test_an_unknown_section_is_refused(recipe_factory, tmp_path, untouched):
    msg = _refused(recipe_factory, tmp_path, optimizer={"lr": 0.01})
    assert msg.startswith("the recipe has no section [optimizer] (did you mean [optimiser]?)")
    msg = _refused(recipe_factory, tmp_path, augmentation={"flip": True})
    assert msg.startswith("the recipe has no section [augmentation]; sections: backbone, data, ")


def test_an_unknown_top_level_key_is_refused(recipe_factory, tmp_path, untouched):
    recipe = recipe_factory(tmp_path)
    for key, value, expected in (
        ("nmae", "x", " (did you mean 'name'?)"),
        ("epochs", 3, " (did you mean 'epochs' in [train]?)"),
        ("bogus", 1, "; known: name, description, out, backbone, "),
    ):
        path = recipe_factory.write(tmp_path / "recipe.toml", {**recipe, key: value})
        with pytest.raises(ConfigError, match=re.escape(f"{path}: the recipe has no setting {key!r}{expected}")):
            run_recipe(path, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "sections,message",
    [
        ({"train": {"epochs": "ten"}}, "[train] epochs must be an integer ≥ 1, got 'ten'"),
        ({"train": {"epochs": 0}}, "[train] epochs must be an integer ≥ 1, got 0"),
        ({"optimiser": {"lr": "fast"}}, "[optimiser] lr must be a number > 0, got 'fast'"),
        ({"sampler": {"contiguous": 1.5}}, "[sampler] contiguous must be a number ≥ 0 and ≤ 1, got 1.5"),
        ({"data": {"folders": "summer"}}, "[data] folders must be a list of strings or None, got 'summer'"),
        ({"backbone": {"image_size": [64]}}, "[backbone] image_size must be [a, b] (two integers) or None, got [64]"),
        ({"backbone": {"cache_prefix": "yes"}}, "[backbone] cache_prefix must be true or false, got 'yes'"),
        ({"loss": {"name": "infonse"}}, "[loss] name must be one of "),
        ({"head": {"vlad": {"weights": 0.5}}}, "[head] vlad has no key 'weights' (did you mean 'weight'?)"),
        ({"head": {"options": {"out_chanels": 3}}}, "unknown option 'out_chanels' (did you mean 'out_channels'?)"),
    ],
)
def test_a_wrong_type_or_value_names_the_field(recipe_factory, tmp_path, untouched, sections, message):
    msg = _refused(recipe_factory, tmp_path, **sections)
    assert message in msg
    if "infonse" in str(sections):
        assert msg.endswith("got 'infonse' (did you mean 'infonce'?)")


def test_a_section_that_is_not_a_table_is_refused(recipe_factory, tmp_path):
    with pytest.raises(ConfigError, match=r"^\[train\] must be a table of settings, got 5$"):
        check_recipe({**recipe_factory(tmp_path), "train": 5})
    check_recipe({**recipe_factory(tmp_path), "post": None})  # an empty YAML section


def test_nothing_is_read_or_built_before_a_refusal_from_a_dict_either(recipe_factory, tmp_path, untouched):
    """``run_recipe`` and ``prepare`` on a dict (the Python API) refuse as ``vprkit train`` does."""
    bad = recipe_factory(tmp_path, train={"epoch": 3})
    with pytest.raises(ConfigError, match=r"^\[train\] has no setting 'epoch' \(did you mean 'epochs'\?\)"):
        run_recipe(bad, progress=False)
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        preparation.prepare(bad, progress=False)
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        settings_from(bad)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_yaml_recipes_are_checked_the_same_way(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "recipe.yaml"
    path.write_text("name: y\nhead:\n  name: layout\noptimiser:\n  learning_rate: 0.01\n")
    with pytest.raises(
        ConfigError, match=re.escape(f"{path}: [optimiser] has no setting 'learning_rate' (did you mean 'lr'?)")
    ):
        load_recipe(path)


def test_the_documented_recipes_pass_the_schema():
    """The README's recipe and the one in ``vprkit.training.recipe``'s docstring use only declared settings."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```toml\n(# nordland\.toml.*?)```", readme, re.S).group(1)
    check_recipe(tomllib.loads(block))
    from vprkit.training import recipe as recipe_module

    lines = recipe_module.__doc__.split("::\n", 1)[1].splitlines()
    example = [line[4:] for line in lines[: next(i for i, x in enumerate(lines) if x and not x.startswith("    "))]]
    parsed = tomllib.loads("\n".join(example))
    assert set(parsed) == {"name", "out", *SECTIONS}  # the docstring shows every section
    check_recipe(parsed)


def test_sections_default_to_the_trainers_defaults():
    """One declaration per section: its defaults are what a recipe that leaves a setting out trains with."""
    assert settings_from({}) == TrainSettings()
    assert section({}, "head")["members"] == 1 and section({"head": {"members": 3}}, "head")["members"] == 3
    assert set(recipe_schema()) == {"", *SECTIONS}
