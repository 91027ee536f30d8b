"""Frames as they come: a video file, a camera, or a folder of frames, as ``(name, image)`` pairs.

A stream is an iterable of ``(name, frame)``; the frame is an RGB ``H×W×3`` uint8 array (video,
camera) or an image path (folder: decoded by the image reader, so EXIF rotation and the other
rules of :mod:`vprkit.images` apply). :func:`vprkit.pipeline.sequences.localize_stream` consumes
any such iterable, so a robot's own frame loop works the same way.

OpenCV (``opencv-python-headless``) decodes video and reads cameras; it is imported only when a
video or camera is opened. A file or camera that cannot be opened is one :class:`ImageReadError`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from .errors import ConfigError, ImageReadError
from .images import list_images

# Names of video frames: "<file stem>#<frame index>" (index in the file, before ``every``).
FRAME_NAME_DIGITS = 6


def _check_counts(every: int, limit: int | None) -> None:
    if every < 1:
        raise ConfigError(f"every must be ≥ 1 (keep every N-th frame), got {every}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be ≥ 1 frames, got {limit}")


class _CaptureFrames:
    """Frames of an OpenCV capture, BGR converted to RGB; ``every`` N-th frame, at most ``limit``."""

    def __init__(self, what: str, prefix: str, every: int = 1, limit: int | None = None):
        _check_counts(every, limit)
        self.what, self.prefix, self.every, self.limit = what, prefix, int(every), limit

    def _open(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        cap = self._open()
        if not cap.isOpened():
            cap.release()
            raise ImageReadError(f"{self.what}: cannot be opened (not a video OpenCV can decode, or no such device)")
        try:
            index = kept = 0
            while self.limit is None or kept < self.limit:
                ok, frame = cap.read()
                if not ok or frame is None:
                    break
                if index % self.every == 0:
                    yield f"{self.prefix}#{index:0{FRAME_NAME_DIGITS}d}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                    kept += 1
                index += 1
            if index == 0:
                raise ImageReadError(f"{self.what}: opened, but no frame could be read")
        finally:
            cap.release()


class VideoFrames(_CaptureFrames):
    """Frames of a video file (anything OpenCV's FFmpeg backend decodes: MP4, AVI, MKV …)."""

    def __init__(self, path: str | os.PathLike, every: int = 1, limit: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ImageReadError(f"{self.path}: video file not found")
        super().__init__(str(self.path), self.path.stem, every, limit)

    def _open(self):
        return cv2.VideoCapture(str(self.path))


class CameraFrames(_CaptureFrames):
    """Frames of camera ``index`` (OpenCV's device number), until ``limit`` or the camera stops.

    A camera does not wait for its reader: when the model is slower than the camera, frames read in order
    fall further and further behind (seconds after a minute), and a robot localises where it *was*. So by
    default a thread keeps reading and only the **newest** frame is handed out; frames passed over are
    counted in :attr:`dropped` and show as gaps in the names' frame numbers. ``every_frame=True`` hands out
    every frame in order instead (a recording, an offline evaluation).
    """

    def __init__(self, index: int = 0, every: int = 1, limit: int | None = None, every_frame: bool = False):
        if index < 0:
            raise ConfigError(f"camera index must be ≥ 0, got {index}")
        self.index = int(index)
        self.every_frame = bool(every_frame)
        self.dropped = 0
        super().__init__(f"camera {index}", f"camera{index}", every, limit)

    def _open(self):
        return cv2.VideoCapture(self.index)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        if self.every_frame:
            yield from super().__iter__()
            return
        cap = self._open()
        if not cap.isOpened():
            cap.release()
            raise ImageReadError(f"{self.what}: cannot be opened (not a video OpenCV can decode, or no such device)")
        newest = _NewestFrame(cap, self.every)
        try:
            last, kept = -1, 0
            while self.limit is None or kept < self.limit:
                got = newest.after(last)
                if got is None:
                    break
                index, frame = got
                if last >= 0:
                    self.dropped += (index - last) // self.every - 1
                last, kept = index, kept + 1
                yield f"{self.prefix}#{index:0{FRAME_NAME_DIGITS}d}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            if last < 0:
                raise ImageReadError(f"{self.what}: opened, but no frame could be read")
        finally:
            newest.stop()
            cap.release()


class _NewestFrame:
    """A thread reading ``cap`` as fast as it delivers, keeping only the newest kept frame (every ``every``-th)."""

    # How long stop() waits for a read in progress (a camera read takes one frame interval).
    STOP_WAIT_S = 5.0

    def __init__(self, cap, every: int):
        self._cap, self._every = cap, every
        self._cond = threading.Condition()
        self._index, self._frame, self._done = -1, None, False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._read, name="vprkit-camera", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        index = 0
        try:
            while not self._stopping.is_set():
                ok, frame = self._cap.read()
                if not ok or frame is None:
                    break
                if index % self._every == 0:
                    with self._cond:
                        self._index, self._frame = index, frame
                        self._cond.notify_all()
                index += 1
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def after(self, last: int) -> tuple[int, np.ndarray] | None:
        """The newest frame read after frame ``last`` (waiting for one), or None once the camera has stopped."""
        with self._cond:
            self._cond.wait_for(lambda: self._index > last or self._done)
            if self._index <= last:
                return None
            return self._index, self._frame

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(self.STOP_WAIT_S)


class FolderFrames:
    """Image files of a folder in sorted name order (frames named ``000001.jpg`` … are time order)."""

    def __init__(self, folder: str | os.PathLike, every: int = 1, limit: int | None = None):
        _check_counts(every, limit)
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ImageReadError(f"{self.folder}: frame folder not found")
        self.keys = list_images(self.folder)[:: int(every)][:limit]
        if not self.keys:
            raise ImageReadError(f"{self.folder}: no images found")

    def __iter__(self) -> Iterator[tuple[str, Path]]:
        for key in self.keys:
            yield key, self.folder / key

    def __len__(self) -> int:
        return len(self.keys)
