"""``vprkit weights list|fetch|verify`` on a toy zoo entry served from a file:// URL (no network)."""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import assert_one_line_error, run_main

from vprkit.zoo import weights
from vprkit.zoo.weights import ZooWeights


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.setenv("VPRKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VPRKIT_OFFLINE", raising=False)
    served = tmp_path / "served.pth"
    served.write_bytes(b"\x80toy weights")
    e = ZooWeights(
        name="toy",
        filename="toy.pth",
        urls=(served.as_uri(),),
        format="torch",
        layout="toy",
        licence="MIT",
        source="https://example.org",
        sha256=hashlib.sha256(b"\x80toy weights").hexdigest(),
    )
    monkeypatch.setitem(weights.ZOO_WEIGHTS._items, "toy", e)
    return tmp_path / "cache" / "zoo" / "toy" / "toy.pth"


def test_list_fetch_verify(toy, monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "weights", "list", "--json")
    row = next(r for r in json.loads(out)["weights"] if r["name"] == "toy")
    assert code == 0 and row["cached"] is False and row["status"] == "missing"
    code, out, _ = run_main(monkeypatch, capsys, "weights", "fetch", "toy")
    assert code == 0 and str(toy) in out and toy.read_bytes() == b"\x80toy weights"
    code, out, _ = run_main(monkeypatch, capsys, "weights", "verify", "toy")
    assert code == 0 and "ok (published SHA-256)" in out
    toy.write_bytes(b"bit flip!!!")
    code, out, err = run_main(monkeypatch, capsys, "weights", "verify", "toy")
    assert "DAMAGED" in out
    assert_one_line_error(code, err, "damaged: toy")


def test_fetch_offline_names_url_and_place(toy, monkeypatch, capsys):
    monkeypatch.setenv("VPRKIT_OFFLINE", "1")
    code, _, err = run_main(monkeypatch, capsys, "weights", "fetch", "toy")
    assert_one_line_error(code, err, "served.pth", str(toy), "--weights")


def test_unknown_entry_and_bad_usage(toy, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "weights", "fetch", "toyy")
    assert_one_line_error(code, err, "unknown zoo weights 'toyy'", "toy")
    code, _, err = run_main(monkeypatch, capsys, "weights", "fetch")
    assert code == 2 and "--all" in err
