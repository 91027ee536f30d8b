"""`vprkit serve`'s flags: where the key comes from, the upload limit, and one-line usage errors (no server started)."""

from __future__ import annotations

from click.testing import CliRunner

import vprkit.service
from vprkit.cli import cli

MB = 1024 * 1024


def _invoke(args, monkeypatch, env=None):
    calls = []
    monkeypatch.setattr(vprkit.service, "serve", lambda map_dir, **kw: calls.append((map_dir, kw)))
    result = CliRunner().invoke(cli, ["serve", *map(str, args)], env=env)
    return result, calls


def test_key_from_a_file_or_a_variable_and_the_upload_limit(tmp_path, monkeypatch):
    (tmp_path / "key.txt").write_text("  s3cret\n")
    result, calls = _invoke(
        [tmp_path, "--api-key-file", tmp_path / "key.txt", "--max-upload-mb", "1.5", "--port", "9001"], monkeypatch
    )
    assert result.exit_code == 0, result.output
    ((_, kw),) = calls
    assert kw["api_key"] == "s3cret" and kw["max_upload_bytes"] == int(1.5 * MB) and kw["port"] == 9001
    assert kw["host"] == "127.0.0.1"
    result, calls = _invoke([tmp_path, "--api-key-env", "VPRKIT_TEST_KEY"], monkeypatch, env={"VPRKIT_TEST_KEY": "k2"})
    assert result.exit_code == 0 and calls[0][1]["api_key"] == "k2"
    result, calls = _invoke([tmp_path], monkeypatch)
    assert result.exit_code == 0 and calls[0][1]["api_key"] is None


def test_key_mistakes_are_usage_errors(tmp_path, monkeypatch):
    (tmp_path / "empty.txt").write_text("\n")
    cases = [
        ([tmp_path, "--api-key-env", "VPRKIT_TEST_UNSET"], "unset or empty"),
        ([tmp_path, "--api-key-file", tmp_path / "empty.txt"], "is empty"),
        ([tmp_path, "--api-key-env", "A", "--api-key-file", tmp_path / "empty.txt"], "not both"),
        ([tmp_path, "--max-upload-mb", "0"], "max-upload-mb"),
    ]
    for args, message in cases:
        result, calls = _invoke(args, monkeypatch, env={"VPRKIT_TEST_UNSET": ""})
        assert result.exit_code == 2 and message in result.output and not calls, result.output
