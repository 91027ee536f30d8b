"""A ``multipart/form-data`` body, already read within its size limit, parsed into its parts in memory.

Synchronous on purpose: the routes call it in the threadpool, so a large upload is split into parts
off the event loop (Starlette's own form parser runs on the loop and spools files over 1 MB to
temporary files). The body is bounded before this runs; the parts add at most its size again.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

# An image and a handful of pose fields fit well within this; more parts are refused.
MAX_PARTS = 16
MAX_PART_HEADERS = 8


class FormError(ValueError):
    """The body is not a well-formed multipart form (the client's mistake: a 422)."""


@dataclass
class Part:
    """One form part: a field (``filename`` None) or a file."""

    name: str
    filename: str | None
    data: bytes


class _Collector:
    """The parser's callbacks, assembling :class:`Part` objects."""

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._data = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: setattr(self, "_field", self._field + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "_value", self._value + d[s:e]),
            "on_header_end": self._header_end,
            "on_part_data": lambda d, s, e: self._data.extend(d[s:e]),
            "on_part_end": self._part_end,
            "on_end": lambda: setattr(self, "ended", True),
        }

    def _begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise FormError(f"more than {MAX_PARTS} form parts")
        self._headers, self._data = {}, bytearray()

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _part_end(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise FormError("a form part without a Content-Disposition: form-data name")
        filename = options.get(b"filename")
        self.parts.append(
            Part(
                options[b"name"].decode("utf-8", "replace"),
                filename.decode("utf-8", "replace") if filename is not None else None,
                bytes(self._data),
            )
        )


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """The parts of ``body`` sent with header ``content_type``; :class:`FormError` when malformed or truncated."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise FormError("a multipart body needs a boundary in its Content-Type")
    collector = _Collector()
    try:
        parser = MultipartParser(boundary, collector.callbacks(), max_header_count=MAX_PART_HEADERS)
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise FormError(str(exc)) from None
    if not collector.ended:
        raise FormError("the multipart body ends before its closing boundary")
    return collector.parts
