"""The default offline preset against issue 2's recall targets, on the real data (seed-0 vocabulary).

Measured with the pipeline over vocabulary seeds 0–7 (``benchmarks/bench_core.py --seeds 8``):
Corridor R@1 0.955–0.964, Nordland-600 R@1 0.375–0.422. The Corridor floor is the issue's target
itself; the Nordland floor sits between the target (0.20) and the lowest seed, so a regression
of the descriptor shows up rather than hiding under the target.
"""

import json

from helpers import run_cli
from vprkit import pipeline
from vprkit.datasets import load_dataset
from vprkit.images import ImageSpec
from vprkit.presets import DEFAULT_PRESET, resolve

CORRIDOR_R1_TARGET = 0.94
NORDLAND_600_R1_FLOOR = 0.30
NORDLAND_SIZE = (112, 224)  # the shared data README's protocol: 64×32 frames upscaled to 224×112


def test_readme_main_job_uses_the_default_preset_and_meets_the_corridor_target(tmp_path, shared_datasets):
    # exactly the README's second command, plus --out to read the summary
    r = run_cli(["eval", "corridor", "--data-root", shared_datasets, "--out", tmp_path / "run", "--quiet"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["name"] == DEFAULT_PRESET
    assert summary["config"]["aggregator_options"]["assignments"] > 1  # multiple assignment is on
    assert summary["recall"]["R@1"] >= CORRIDOR_R1_TARGET, summary["recall"]
    assert summary["recall"]["R@5"] == 1.0


def test_default_preset_on_nordland_600_winter_vs_summer(shared_datasets, monkeypatch):
    monkeypatch.setenv("VPRKIT_DATA", str(shared_datasets))
    ds = load_dataset("nordland-64x32:600")
    assert len(ds.query_images) == 600 and ds.queries_dir.name == "winter"
    config = resolve(DEFAULT_PRESET).replace(image=ImageSpec(NORDLAND_SIZE, "fixed"))
    summary = pipeline.evaluate(ds, config, progress=False, log=lambda _: None)
    assert summary["recall"]["R@1"] >= NORDLAND_600_R1_FLOOR, summary["recall"]
