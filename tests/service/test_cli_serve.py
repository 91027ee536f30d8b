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


def test_limits_are_options_with_the_library_defaults(tmp_path, monkeypatch):
    from vprkit.service import ServiceLimits

    result, calls = _invoke([tmp_path], monkeypatch)
    assert result.exit_code == 0 and calls[0][1]["limits"] == ServiceLimits()  # the CLI's defaults are the library's
    args = ["--max-model-requests", "4", "--header-timeout", "2.5", "--max-connections-per-client", "0"]
    args += ["--body-timeout", "3", "--min-body-rate", "10", "--keep-alive-timeout", "1"]
    result, calls = _invoke([tmp_path, *args], monkeypatch)
    assert result.exit_code == 0, result.output
    assert calls[0][1]["limits"] == ServiceLimits(
        max_model_requests=4,
        header_timeout_s=2.5,
        max_connections_per_client=0,
        body_timeout_s=3.0,
        min_body_rate=10.0,
        keep_alive_timeout_s=1.0,
    )
    result, calls = _invoke([tmp_path, "--prepare-rerank", "storage", "--prepare-rerank", "speed"], monkeypatch)
    assert result.exit_code == 0 and calls[0][1]["prepare_rerank"] == ("storage", "speed"), result.output
    from vprkit import uploads

    before = uploads.default_budget(), uploads.default_max_decoded_bytes()
    try:
        result, calls = _invoke([tmp_path, "--decode-budget-mb", "200", "--max-decoded-mb", "50"], monkeypatch)
        assert result.exit_code == 0, result.output
        assert uploads.default_budget().limit_bytes == 200 * uploads.MEGABYTE
        assert uploads.default_max_decoded_bytes() == 50 * uploads.MEGABYTE
    finally:
        uploads.configure_decoding(budget_bytes=before[0].limit_bytes, max_decoded_bytes=before[1])
    for bad in (["--max-model-requests", "0"], ["--header-timeout", "0"], ["--max-connections", "-1"]):
        result, calls = _invoke([tmp_path, *bad], monkeypatch)
        assert result.exit_code == 2 and bad[0] in result.output and not calls, result.output


def test_a_map_that_does_not_open_is_one_line_and_exit_2(map_dir, monkeypatch, capsys):
    """`vprkit serve` on a damaged map: one line on stderr, exit 2, nothing listening (the real entry point)."""
    import sys

    import uvicorn

    from vprkit.cli import main

    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: started.append(self))
    (map_dir / "store.h5").write_bytes(b"not hdf5 at all")
    monkeypatch.setattr(sys, "argv", ["vprkit", "serve", str(map_dir), "--port", "0"])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and not started, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert "store.h5" in err


def test_a_busy_port_is_one_line_and_exit_2_before_the_map_is_loaded(map_dir, monkeypatch, capsys):
    """The port is bound before minutes of loading: a taken one is an `error:` line, exit 2, and no "serving"."""
    import socket
    import sys

    from vprkit.cli import main
    from vprkit.pipeline.live import LiveMap

    opened = []
    monkeypatch.setattr(LiveMap, "open", classmethod(lambda cls, *a, **k: opened.append(a)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(sys, "argv", ["vprkit", "serve", str(map_dir), "--port", str(port)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
    out, err = capsys.readouterr()
    assert code == 2 and not opened and "serving" not in out, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen on 127.0.0.1:") and str(port) in lines[0], err
