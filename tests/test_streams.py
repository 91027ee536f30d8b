"""Streams: video files, frame folders and cameras → frames → `vprkit localize --video/--frames` as JSON lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli
from vprkit import pipeline
from vprkit.cli import main
from vprkit.errors import ConfigError, ImageReadError
from vprkit.pipeline.sequences import localize_stream
from vprkit.streams import CameraFrames, FolderFrames, VideoFrames

MAP_FRAMES = 16  # Corridor reference frames in the test map
MAP_IMAGE_SIZE = (120, 160)  # (height, width): Corridor's own size, a quarter of the preset's pixels
VIDEO_FPS = 5.0


def _corridor_frames(root: Path, first: int, count: int, sub: str = "ref") -> list[Path]:
    return [root / "corridor" / sub / f"{i:07d}.jpg" for i in range(first, first + count)]


def _write_video(path: Path, frames: list[Path]) -> Path:
    import cv2

    first = cv2.imread(str(frames[0]))
    h, w = first.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), VIDEO_FPS, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.imread(str(f)))
    writer.release()
    return path


@pytest.fixture
def stream_map(corridor_map) -> Path:
    """A small map of Corridor's first reference frames (GeM: no vocabulary, fast), from conftest's corridor_map."""
    return corridor_map("effnet-gem", image_size=MAP_IMAGE_SIZE, count=MAP_FRAMES)


def test_video_file_gives_rgb_frames_in_order(tmp_path, shared_datasets):
    frames = _corridor_frames(shared_datasets, 0, 6)
    video = _write_video(tmp_path / "walk.avi", frames)
    got = list(VideoFrames(video))
    assert [n for n, _ in got] == [f"walk#{i:06d}" for i in range(6)]
    from PIL import Image

    original = np.asarray(Image.open(frames[2]).convert("RGB"), dtype=np.float32)
    assert got[2][1].shape == original.shape and got[2][1].dtype == np.uint8
    assert np.abs(got[2][1].astype(np.float32) - original).mean() < 12  # RGB order, only compression noise
    assert [n for n, _ in VideoFrames(video, every=2, limit=2)] == ["walk#000000", "walk#000002"]


def test_unopenable_video_and_bad_arguments_are_clear_errors(tmp_path):
    bad = tmp_path / "not-a-video.mp4"
    bad.write_text("hello")
    with pytest.raises(ImageReadError, match="cannot be opened|no frame"):
        list(VideoFrames(bad))
    with pytest.raises(ImageReadError, match="not found"):
        VideoFrames(tmp_path / "missing.mp4")
    with pytest.raises(ImageReadError, match="camera 97"):
        list(CameraFrames(97, limit=1))
    with pytest.raises(ConfigError):
        VideoFrames(bad, every=0)


def test_unopenable_video_on_the_command_line_is_one_error_line(tmp_path, stream_map, capsys, monkeypatch):
    bad = tmp_path / "broken.avi"
    bad.write_bytes(b"\x00" * 64)
    monkeypatch.setattr("sys.argv", ["vprkit", "localize", str(stream_map), "--video", str(bad)])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and "broken.avi" in err[0]


def test_localize_video_prints_json_lines_and_writes_jsonl(tmp_path, shared_datasets, stream_map):
    video = _write_video(tmp_path / "drive.avi", _corridor_frames(shared_datasets, 4, 4))
    r = run_cli(["localize", stream_map, "--video", video, "--top-k", "3", "--json", "--jsonl", tmp_path / "out.jsonl"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.output.strip().splitlines()]
    assert [x["query"] for x in lines] == [f"drive#{i:06d}" for i in range(4)]
    assert [x["matches"][0]["image"] for x in lines] == [f"{i:07d}.jpg" for i in range(4, 8)]
    assert all(len(x["matches"]) == 3 for x in lines)
    assert [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()] == lines


def test_localize_frames_folder_with_a_sequence(tmp_path, shared_datasets, stream_map):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, src in enumerate(_corridor_frames(shared_datasets, 2, 6)):
        (folder / f"{i:04d}.jpg").write_bytes(src.read_bytes())
    r = run_cli(["localize", stream_map, "--frames", folder, "--sequence-length", "3", "--top-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.output.strip().splitlines()]
    assert [x["query"] for x in lines] == [f"{i:04d}.jpg" for i in range(6)]
    top = [int(x["matches"][0]["image"][:7]) for x in lines]
    assert top[2:] == list(range(4, 8))  # once three frames are seen, the sequence is exact
    assert [x["sequence_frames"] for x in lines] == [1, 2, 3, 3, 3, 3]
    assert lines[-1]["matches"][0]["score_kind"] == "sequence_mean_cosine"
    assert -1 <= lines[-1]["matches"][0]["cosine"] <= 1
    r = run_cli(["localize", stream_map, "--frames", folder, "--video", folder / "x.avi"])
    assert r.exit_code != 0 and "exactly one" in r.output
    r = run_cli(["localize", stream_map, "--frames", folder, "--every-frame"])
    assert r.exit_code == 2 and "--every-frame applies to --camera" in r.output


def test_every_frame_of_a_sequence_stream_carries_an_estimate(tmp_path, shared_datasets, stream_map):
    """Issue 27 item 4: sequence results have the single image's estimate (confidence, unknown, route position)."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, src in enumerate(_corridor_frames(shared_datasets, 3, 7)):
        (folder / f"{i:04d}.jpg").write_bytes(src.read_bytes())
    r = run_cli(["localize", stream_map, "--frames", folder, "--sequence-length", "4", "--top-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.output.strip().splitlines()]
    assert len(lines) == 7
    for i, x in enumerate(lines):
        est = x["estimate"]
        assert "confidence" in est and est["unknown"] in (True, False, None)
        assert est["confidence"] is not None or est["unknown"] is None  # never "known" without a confidence
        assert est["route_position"] is not None
        assert est["evidence"]["sequence"]["frames"] == min(i + 1, 4) == x["sequence_frames"]
        top = x["matches"][0]
        # the score is the mean raw cosine along the trajectory: a cosine, close to the frame's own
        assert top["score_kind"] == "sequence_mean_cosine" and abs(top["score"] - top["cosine"]) < 0.2
    assert lines[-1]["estimate"]["evidence"]["sequence"]["support"] > 0.5  # the frames agree with the path
    text = run_cli(["localize", stream_map, "--frames", folder, "--sequence-length", "4", "--top-k", "1"])
    assert text.exit_code == 0 and text.output.count("confidence") == 7


def test_python_stream_api_takes_decoded_frames_and_reports_bad_ones(shared_datasets, stream_map):
    from PIL import Image

    frames = [np.asarray(Image.open(p).convert("RGB")) for p in _corridor_frames(shared_datasets, 6, 3)]
    stream = [("a", frames[0]), ("broken", np.zeros((2, 2, 7), np.uint8)), ("b", frames[1]), ("c", frames[2])]
    m = pipeline.open_map(stream_map, read_only=True)
    results = list(localize_stream(m, stream, top_k=1, sequence_length=2, batch_frames=2))
    assert [r.query for r in results] == ["a", "broken", "b", "c"]
    assert results[1].error and not results[1].matches
    assert [r.matches[0].key for r in results if r.error is None] == ["0000006.jpg", "0000007.jpg", "0000008.jpg"]
    assert len(list(FolderFrames(shared_datasets / "corridor" / "ref", every=10))) == 12


class _PacedCamera:
    """A stand-in for cv2.VideoCapture: ``frames`` BGR frames, one every ``interval_s`` (a camera's pace)."""

    def __init__(self, frames: int, interval_s: float, opened: bool = True):
        self.left, self.interval_s, self.opened, self.index = frames, interval_s, opened, 0

    def isOpened(self) -> bool:
        return self.opened

    def read(self):
        import time

        if self.left == 0:
            return False, None
        time.sleep(self.interval_s)
        frame = np.full((4, 6, 3), self.index % 256, np.uint8)
        self.left, self.index = self.left - 1, self.index + 1
        return True, frame

    def release(self) -> None:
        self.opened = False


def _frame_numbers(names: list[str]) -> list[int]:
    return [int(n.split("#")[1]) for n in names]


def test_a_slow_reader_of_a_camera_gets_the_newest_frame_not_a_growing_backlog(monkeypatch):
    """The model is slower than the camera: frames passed over are dropped (and counted), never queued."""
    import time

    camera_pace_s, model_s, total = 0.005, 0.05, 120
    monkeypatch.setattr(CameraFrames, "_open", lambda self: _PacedCamera(total, camera_pace_s))
    stream = CameraFrames(0)
    numbers = []
    for name, frame in stream:
        numbers.append(int(name.split("#")[1]))
        assert frame[0, 0, 0] == numbers[-1] % 256  # the frame named, converted BGR → RGB
        time.sleep(model_s)
    assert numbers == sorted(set(numbers)) and numbers[-1] >= total - 1 - model_s / camera_pace_s
    assert len(numbers) < total / 3 and stream.dropped == numbers[-1] - numbers[0] - (len(numbers) - 1)
    monkeypatch.setattr(CameraFrames, "_open", lambda self: _PacedCamera(total, camera_pace_s))
    in_order = CameraFrames(0, every_frame=True, limit=30)
    assert _frame_numbers([name for name, _ in in_order]) == list(range(30))  # every frame, as a recording wants
    monkeypatch.setattr(CameraFrames, "_open", lambda self: _PacedCamera(total, 0.0))
    assert _frame_numbers([n for n, _ in CameraFrames(0, every=4, every_frame=True, limit=3)]) == [0, 4, 8]


def test_a_camera_that_gives_no_frame_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(CameraFrames, "_open", lambda self: _PacedCamera(0, 0.0))
    with pytest.raises(ImageReadError, match="no frame could be read"):
        list(CameraFrames(3))
    monkeypatch.setattr(CameraFrames, "_open", lambda self: _PacedCamera(5, 0.0, opened=False))
    with pytest.raises(ImageReadError, match="cannot be opened"):
        list(CameraFrames(3))
