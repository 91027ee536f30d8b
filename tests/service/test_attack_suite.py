"""Issue 26's attack suite (scripts/attack_service.py): its quick subset finds no failure on the served map, and
its judges are honest (a wrong answer, a NaN, a non-loopback host are caught, not passed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "attack_service.py"
# The quick subset (about 4 minutes on 2 shared cores): a few server start-ups and CLI runs on a 40-image map, the
# slow-client bound (30 s) at most once.
QUICK_BOUND_S = 1200
# Every numbered failure of the issue has at least one case in the quick subset (item → a case name fragment).
ITEMS = {
    1: "easting 1e160",
    2: "store.h5 from another map",
    3: "idle TCP connections",
    4: "16-bit",
    5: "rerank=performance",
    6: "PATCH 50 MB",
    7: "writers",
    8: "full disk",
    9: "CJK",
    10: "api_key",
}


@pytest.fixture(scope="module")
def attack():
    spec = importlib.util.spec_from_file_location("attack_service", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["attack_service"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_quick_attack_suite_finds_no_failure(tmp_path, shared_datasets):
    out = tmp_path / "attack.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--data", str(shared_datasets), "--json-out", str(out)],
        capture_output=True,
        text=True,
        timeout=QUICK_BOUND_S,
        check=False,
    )
    assert out.exists(), f"the suite wrote no results (exit {run.returncode}): {run.stderr[-2000:]}"
    results = json.loads(out.read_text())["results"]
    names = " ".join(r["case"] for r in results)
    missing = {item: fragment for item, fragment in ITEMS.items() if fragment not in names}
    assert not missing, f"issue items without a case in the quick run: {missing}"
    failures = [f"{r['case']}: {r['observed']}" for r in results if r["verdict"] == "FAIL"]
    assert not failures, "attack cases that fail:\n" + "\n".join(failures)
    assert run.returncode == 0, run.stdout[-3000:]


def test_the_suite_attacks_loopback_only(attack):
    assert attack.require_loopback("127.0.0.1") == "127.0.0.1"
    assert attack.require_loopback("::1") == "::1"
    assert attack.require_loopback("localhost") == "127.0.0.1"
    for host in ("0.0.0.0", "10.1.2.3", "192.168.0.1", "example.com", "::"):
        with pytest.raises(SystemExit, match="loopback"):
            attack.require_loopback(host)


def test_strict_json_refuses_nan_and_infinity(attack):
    assert attack.strict_json('{"a": 1.5, "b": null}') == {"a": 1.5, "b": None}
    for text in ('{"spread_m": Infinity}', '{"x": NaN}', "[-Infinity]"):
        with pytest.raises(ValueError, match="invalid JSON constant"):
            attack.strict_json(text)


def _answer(ids, cosine=1.0, confidence=0.8):
    return {
        "matches": [{"image": k, "cosine": cosine if i == 0 else 0.5} for i, k in enumerate(ids)],
        "estimate": {"confidence": confidence},
    }


def test_a_silent_wrong_answer_is_not_a_pass(attack):
    reference = {"confidence": 0.8}
    assert attack.judge_answer(_answer(["a.jpg", "b.jpg"]), "a.jpg", reference) is None
    assert "top-1 b.jpg" in attack.judge_answer(_answer(["b.jpg", "a.jpg"]), "a.jpg", reference)
    assert "twice" in attack.judge_answer(_answer(["a.jpg", "a.jpg"]), "a.jpg", reference)
    assert "cosine 0.189" in attack.judge_answer(_answer(["a.jpg"], cosine=0.189), "a.jpg", reference)
    assert "confidence 0.0" in attack.judge_answer(_answer(["a.jpg"], confidence=0.0), "a.jpg", reference)
    assert "confidence None" in attack.judge_answer(_answer(["a.jpg"], confidence=None), "a.jpg", reference)


def test_cli_verdicts(attack):
    ref = {"confidence": 0.8}
    ok = attack.CliRun(0, json.dumps([_answer(["a.jpg"])]), "", 1.0)
    assert attack.judge_cli(ok, "a.jpg", ref)[0] == attack.PASS
    refused = attack.CliRun(2, "", "error: store.h5 does not belong to this map\n", 1.0)
    assert attack.judge_cli(refused, "a.jpg", ref)[0] == attack.PASS
    crash = attack.CliRun(3, "", "Traceback (most recent call last):\n  ...\nAssertionError\n", 1.0)
    assert attack.judge_cli(crash, "a.jpg", ref)[0] == attack.FAIL
    nan = attack.CliRun(0, '[{"matches": [], "estimate": {"spread_m": Infinity}}]', "", 1.0)
    assert "invalid JSON" in attack.judge_cli(nan, "a.jpg", ref)[1]
    wrong = attack.CliRun(0, json.dumps([_answer(["b.jpg", "a.jpg"])]), "", 1.0)
    assert attack.judge_cli(wrong, "a.jpg", ref)[0] == attack.FAIL
    hung = attack.CliRun(None, "", "", 180.0)
    assert attack.judge_cli(hung, "a.jpg", ref)[0] == attack.FAIL


def test_bytes_written_counts_replaced_and_grown_files(attack):
    before = {"index.faiss": (1, 1000, 5), "store.h5": (2, 500, 5), "descriptors.npy": (3, 800, 5)}
    after = {
        "index.faiss": (9, 1040, 6),  # renamed over: written whole
        "store.h5": (2, 500, 5),  # untouched
        "descriptors.npy": (3, 840, 6),  # appended in place: the growth
        "live/append-000000002.h5": (10, 60, 6),  # new
    }
    assert attack._written(before, after) == {
        "index.faiss": 1040,
        "descriptors.npy": 40,
        "live/append-000000002.h5": 60,
    }


def test_a_case_that_raises_is_a_failure_and_not_run_is_not_a_pass(attack):
    suite = attack.Suite(quick=True, only=None)

    def broken():
        raise RuntimeError("the script broke")

    suite.run("broken", 1, "anything", broken)
    suite.run("skipped", 1, "anything", lambda: attack.not_run("no mount here"))
    suite.run("full only", 1, "anything", lambda: attack.passed("x"), quick=False)
    verdicts = {r.case: r.verdict for r in suite.results}
    assert verdicts == {"broken": attack.FAIL, "skipped": attack.NOT_RUN}
    assert "1 FAIL, 1 NOT RUN" in suite.table().replace("0 PASS, ", "")
