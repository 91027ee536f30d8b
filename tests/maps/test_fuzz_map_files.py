"""Damaged manifests and derived files of a real map (scripts/fuzz_inputs.py --campaign map-files): every damage is a
one-line error or the correct answer; and the campaign's damages and judge do what they say."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
# Every (file, damage) pair once (about 70 opens and localisations of a 12-image map), then random pairs this long.
RANDOM_SECONDS = 20
BOUND_S = 1200


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("map_file_fuzz", SCRIPTS / "map_file_fuzz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["map_file_fuzz"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_damaged_map_files_are_refused_in_one_line_or_answered_correctly(tmp_path, shared_datasets):
    out = tmp_path / "outcomes.json"
    command = [sys.executable, str(SCRIPTS / "fuzz_inputs.py"), "--campaign", "map-files", "--seed", "0"]
    command += ["--seconds", str(RANDOM_SECONDS), "--data", str(shared_datasets), "--json-out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=BOUND_S, check=False)
    assert out.exists(), f"no outcomes (exit {run.returncode}): {run.stderr[-2000:]}"
    outcomes = json.loads(out.read_text())
    tried = {(o["target"], o["damage"]) for o in outcomes if o["kind"] != "skipped"}
    for target in ("map.json", "index.json", "build.json", "calibration.json", "descriptors.npy", "index shard"):
        assert (target, "truncate") in tried and (target, "swap: another map") in tried
    for target in ("store.h5", "append file", "re-ranking state", "re-ranking rows"):
        assert (target, "bit flips") in tried and (target, "swap: another map") in tried
    assert {
        ("index.json", "shard path"),
        ("append file", "duplicate keys"),
        ("store.h5", "swap: another preset"),
    } <= tried
    findings = [
        f"{o['target']} / {o['damage']} ({o['detail']}): {o['message']}" for o in outcomes if o["kind"] == "finding"
    ]
    assert not findings, "damaged map files answered wrongly or with a traceback:\n" + "\n".join(findings)
    assert run.returncode == 0, run.stdout[-3000:]


def _answer(ids, cosine=1.0, confidence=0.7):
    return {
        "matches": [{"image": k, "cosine": cosine if i == 0 else 0.4} for i, k in enumerate(ids)],
        "estimate": {"confidence": confidence},
    }


def test_the_judge_catches_silent_wrong_answers(fuzz):
    pristine = _answer(["a.jpg", "b.jpg"])
    assert fuzz.judge(_answer(["a.jpg", "b.jpg"]), "a.jpg", pristine) is None
    assert "top-1 b.jpg" in fuzz.judge(_answer(["b.jpg"]), "a.jpg", pristine)
    assert "twice" in fuzz.judge(_answer(["a.jpg", "a.jpg"]), "a.jpg", pristine)
    assert "cosine" in fuzz.judge(_answer(["a.jpg"], cosine=0.189), "a.jpg", pristine)
    assert "confidence 0.0" in fuzz.judge(_answer(["a.jpg"], confidence=0.0), "a.jpg", pristine)
    assert "no matches" in fuzz.judge({"matches": []}, "a.jpg", pristine)


def _fake_map(root: Path) -> Path:
    m = root / "a" / "b" / "map"
    for name in ("map.json", "index.json", "store.h5", "index-shards/shard-0000.g1.faiss", "live/append-000000001.h5"):
        (m / name).parent.mkdir(parents=True, exist_ok=True)
        (m / name).write_bytes(b"{}" if name.endswith(".json") else b"\x01\x02\x03\x04" * 8)
    (m / "index.json").write_text(json.dumps({"shards": [{"file": "index-shards/shard-0000.g1.faiss", "rows": 4}]}))
    return m


def _templates(fuzz, tmp_path: Path):
    other = tmp_path / "other"
    (other / "index-shards").mkdir(parents=True)
    (other / "map.json").write_text("{}")
    (other / "index-shards" / "shard-0000.g1.faiss").write_bytes(b"foreign shard")
    (other / "store.h5").write_bytes(b"other store")
    return fuzz.Templates(_fake_map(tmp_path), other, other, tmp_path / "q.jpg", {})


def test_shard_paths_lead_out_of_the_map_to_a_foreign_shard(fuzz, tmp_path):
    t = _templates(fuzz, tmp_path)
    detail = fuzz._shard_path(t.map / "index.json", random.Random(1), t)
    new = json.loads((t.map / "index.json").read_text())["shards"][0]["file"]
    assert new in detail and new != "index-shards/shard-0000.g1.faiss"
    assert (t.map.parent / "x").read_bytes() == b"foreign shard"  # what ../x reads


def test_duplicate_append_and_swaps(fuzz, tmp_path):
    t = _templates(fuzz, tmp_path)
    fuzz._duplicate_append(t.map / "live" / "append-000000001.h5", random.Random(0), t)
    assert (t.map / "live" / "append-000000002.h5").read_bytes() == (
        t.map / "live" / "append-000000001.h5"
    ).read_bytes()
    fuzz.DAMAGES["swap: another map"](t.map / "store.h5", random.Random(0), t)
    assert (t.map / "store.h5").read_bytes() == b"other store"
    rng = random.Random(3)
    assert "bit(s) flipped" in fuzz._bitflip(t.map / "index-shards" / "shard-0000.g1.faiss", rng, t)
    assert (t.map / "index-shards" / "shard-0000.g1.faiss").read_bytes() != b"\x01\x02\x03\x04" * 8


def test_every_file_present_gets_every_damage(fuzz, tmp_path):
    m = _fake_map(tmp_path)
    pairs = set(fuzz.combos(m))
    for target in ("map.json", "index.json", "store.h5", "index shard", "append file"):
        for damage in fuzz.DAMAGES:
            assert (target, damage) in pairs
    assert {("index.json", "shard path"), ("append file", "duplicate keys"), ("map.json", "json edit")} <= pairs
    assert not any(target == "descriptors.npy" for target, _ in pairs)  # absent from this map


def test_a_finding_fails_the_run(fuzz, capsys):
    ok = fuzz.Outcome("store.h5", "truncate", "cut", True, "refused", "MapError: damaged")
    bad = fuzz.Outcome("store.h5", "swap: another map", "other", False, "finding", "silent wrong answer: top-1 x")
    assert fuzz.report([ok], None) == 0
    assert fuzz.report([ok, bad], None) == 1
    assert "FINDING [store.h5 / swap: another map" in capsys.readouterr().out
