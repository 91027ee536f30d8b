"""Prediction galleries: each query beside its top-N retrieved images, correct ones framed green, wrong ones red.

What VPR-methods-evaluation's ``--num_preds_to_save`` draws, ordered for looking at failures: the
*worst* queries first (no positive in the list, then the first positive furthest down; among equals
the most confident top-1 first, since a confident wrong match is the most telling), then the *best*
(correct at rank 1, most confident first). One PNG per query row, written under ``predictions/``
with an ``index.csv``; the count is capped (``n_worst`` + ``n_best``).

Colours: query frame blue, correct green, wrong red, unknown (no ground truth) grey; each tile also
says ``correct``/``wrong`` in words, so the marking does not rest on colour alone. A query with no
positive among the drawn predictions gets one more tile after a gap, framed purple: a true match
from the ground truth (the first positive retrieved further down, else the middle positive), so
one sees what it should have found.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..io import atomic_path
from .report import write_csv

THUMB_SIZE = (160, 120)  # width, height of the box each image is fitted into
BORDER = 5
GAP = 8
CAPTION_LINES = 2
LINE_H = 14
TITLE_H = 20
FONT_SIZE = 11
TITLE_FONT_SIZE = 13
BACKGROUND = (255, 255, 255)
COLOURS = {
    "query": (49, 104, 181),
    "truth": (118, 42, 131),
    True: (26, 152, 80),
    False: (215, 48, 39),
    None: (150, 150, 150),
}
DEFAULT_WORST = 20
DEFAULT_BEST = 10
GALLERY_DIR = "predictions"
INDEX_FILE = "index.csv"


@dataclass
class GalleryEntry:
    """One drawn query row."""

    kind: str  # "worst" or "best"
    position: int  # 1-based within its kind
    query_index: int
    query: str
    first_positive_rank: int | None  # 1-based, None when no positive is in the list
    top1_score: float
    png: bytes
    file: str = ""  # relative to the run folder, once written


def gallery_order(
    first_rank: np.ndarray,
    top1_score: np.ndarray,
    n_worst: int = DEFAULT_WORST,
    n_best: int = DEFAULT_BEST,
    evaluated: np.ndarray | None = None,
) -> tuple[list[int], list[int]]:
    """Query indices of the worst and of the best queries, in display order.

    ``first_rank``: 0-based rank of each query's first positive, −1 when none is in the list.
    Worst: queries not correct at rank 1 — first those with no positive in the list, then by
    decreasing rank of the first positive; ties by decreasing top-1 score (confidently wrong first),
    then by query index. Best: queries correct at rank 1 by decreasing top-1 score. Queries with
    ``evaluated`` False (left out by the no-positive policy) appear in neither. Non-finite scores
    sort last.
    """
    first = np.asarray(first_rank, dtype=np.int64).ravel()
    score = np.asarray(top1_score, dtype=np.float64).ravel()
    ok = np.ones(first.size, bool) if evaluated is None else np.asarray(evaluated, bool).ravel()
    score = np.where(np.isfinite(score), score, -np.inf)
    idx = np.arange(first.size)
    rank_key = np.where(first < 0, np.iinfo(np.int64).max, first)
    wrong = idx[ok & (first != 0)]
    # lexsort: last key is primary. Primary: rank descending; then score descending; then index ascending.
    worst = wrong[np.lexsort((wrong, -score[wrong], -rank_key[wrong]))]
    right = idx[ok & (first == 0)]
    best = right[np.lexsort((right, -score[right]))]
    return [int(i) for i in worst[: max(0, n_worst)]], [int(i) for i in best[: max(0, n_best)]]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _load(path: Path | None, box: tuple[int, int]):
    """The image fitted into ``box`` (aspect kept, scaled up or down), or a grey placeholder."""
    w, h = box
    if path is not None:
        try:
            with Image.open(path) as im:
                im.draft("RGB", (w, h))
                im = im.convert("RGB")
                scale = min(w / im.width, h / im.height)
                size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                return im.resize(size, Image.Resampling.LANCZOS), True
        except (OSError, ValueError):
            pass
    return Image.new("RGB", (w, h // 2), (200, 200, 200)), False


def _fit(text: str, draw, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text


def draw_prediction_row(
    query_path: Path | None,
    query_label: str,
    predictions: Sequence[tuple[Path | None, str, bool | None]],
    title: str = "",
    thumb: tuple[int, int] = THUMB_SIZE,
    truth: tuple[Path | None, str] | None = None,
):
    """One row: the query, then each prediction ``(image path, caption, correct)``; returns a PIL image.

    ``truth``: an extra ``(image path, caption)`` tile, after a wider gap, for a true match of the query.

    Each tile is the image fitted in ``thumb`` with a coloured frame and two caption lines under it
    (the first line of ``caption`` — rank and score — and ``correct``/``wrong``, then the name).
    """
    font, title_font = _font(FONT_SIZE), _font(TITLE_FONT_SIZE)
    tw, th = thumb
    tile_w, tile_h = tw + 2 * BORDER, th + 2 * BORDER
    n = 1 + len(predictions) + (truth is not None)
    width = n * tile_w + (n - 1) * GAP + 2 * GAP + (3 * GAP if truth is not None else 0)
    top = TITLE_H if title else 0
    height = top + tile_h + CAPTION_LINES * LINE_H + 2 * GAP
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((GAP, 4), _fit(title, draw, title_font, width - 2 * GAP), fill=(0, 0, 0), font=title_font)
    tiles = [(query_path, query_label, "query")] + [(p, c, ok) for p, c, ok in predictions]
    if truth is not None:
        tiles.append((truth[0], truth[1], "truth"))
    for i, (path, caption, status) in enumerate(tiles):
        x0, y0 = GAP + i * (tile_w + GAP) + (3 * GAP if status == "truth" else 0), top + GAP
        colour = COLOURS[status]
        draw.rectangle([x0, y0, x0 + tile_w - 1, y0 + tile_h - 1], fill=colour)
        draw.rectangle([x0 + BORDER, y0 + BORDER, x0 + BORDER + tw - 1, y0 + BORDER + th - 1], fill=(245, 245, 245))
        img, readable = _load(path, thumb)
        canvas.paste(img, (x0 + BORDER + (tw - img.width) // 2, y0 + BORDER + (th - img.height) // 2))
        if not readable:
            draw.text(
                (x0 + BORDER + 4, y0 + BORDER + 4),
                "unreadable" if path is not None else "no image",
                fill=(60, 60, 60),
                font=font,
            )
        lines = caption.split("\n")
        if status not in ("query", "truth"):
            verdict = {True: "correct", False: "wrong", None: "unlabelled"}[status]
            lines = [f"{lines[0]}  {verdict}"] + lines[1:]
        for j, line in enumerate(lines[:CAPTION_LINES]):
            draw.text(
                (x0, y0 + tile_h + 2 + j * LINE_H),
                _fit(line, draw, font, tile_w),
                fill=colour if (j == 0 and status != "query") else (40, 40, 40),
                font=font,
            )
    return canvas


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _safe_stem(key: str, limit: int = 60) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(key).with_suffix("").as_posix())
    return stem[-limit:]


def build_galleries(
    query_keys: Sequence[str],
    database_keys: Sequence[str],
    ranked: np.ndarray,
    scores: np.ndarray,
    first_rank: np.ndarray,
    correct: np.ndarray | None,
    queries_dir: str | os.PathLike | None,
    database_dir: str | os.PathLike | None,
    n_predictions: int,
    n_worst: int = DEFAULT_WORST,
    n_best: int = DEFAULT_BEST,
    evaluated: np.ndarray | None = None,
    thumb: tuple[int, int] = THUMB_SIZE,
    positives: Sequence[np.ndarray] | None = None,
) -> list[GalleryEntry]:
    """Draw the worst and best queries with their top ``n_predictions`` (PNG bytes, not yet written).

    ``correct`` is the Q×K hit matrix (None without ground truth: grey frames). Image paths are
    ``queries_dir / key`` and ``database_dir / key``; a missing folder draws placeholders.
    ``positives`` (the ground truth's database indices per query) adds a true-match tile to rows
    with no correct prediction drawn.
    """
    ranked = np.asarray(ranked)
    scores = np.asarray(scores, dtype=np.float64).reshape(ranked.shape[0], -1)
    n_predictions = max(1, min(int(n_predictions), ranked.shape[1]))
    top1 = scores[:, 0] if scores.shape[1] else np.full(ranked.shape[0], np.nan)
    worst, best = gallery_order(first_rank, top1, n_worst, n_best, evaluated)
    qdir = Path(queries_dir) if queries_dir is not None else None
    ddir = Path(database_dir) if database_dir is not None else None
    entries: list[GalleryEntry] = []
    for kind, order in (("worst", worst), ("best", best)):
        for pos, q in enumerate(order, 1):
            fr = int(first_rank[q])
            found = f"first positive at rank {fr + 1}" if fr >= 0 else f"no positive in the top {ranked.shape[1]}"
            title = (
                f"{kind} {pos}/{len(order)}: query {query_keys[q]} - {found}"  # ASCII: the default font has no dashes
            )
            preds = []
            for k in range(n_predictions):
                row = int(ranked[q, k])
                if row < 0:
                    preds.append((None, f"#{k + 1}\n(empty)", None))
                    continue
                ok = None if correct is None else bool(correct[q, k])
                preds.append(
                    (
                        ddir / database_keys[row] if ddir else None,
                        f"#{k + 1}  {scores[q, k]:.3f}\n{database_keys[row]}",
                        ok,
                    )
                )
            truth = None
            if positives is not None and not (0 <= fr < n_predictions) and len(positives[q]):
                row = int(ranked[q, fr]) if fr >= 0 else int(positives[q][len(positives[q]) // 2])
                where = f"true match (#{fr + 1})" if fr >= 0 else "true match"
                truth = (ddir / database_keys[row] if ddir else None, f"{where}\n{database_keys[row]}")
            image = draw_prediction_row(
                qdir / query_keys[q] if qdir else None, f"query\n{query_keys[q]}", preds, title, thumb, truth
            )
            entries.append(
                GalleryEntry(kind, pos, q, query_keys[q], fr + 1 if fr >= 0 else None, float(top1[q]), _png(image))
            )
    return entries


def write_galleries(out: str | os.PathLike, entries: Sequence[GalleryEntry]) -> list[Path]:
    """``predictions/{worst,best}-NNN_<query>.png`` and ``predictions/index.csv`` under ``out`` (atomic writes)."""
    out = Path(out)
    folder = out / GALLERY_DIR
    if folder.is_dir():  # rows of an earlier run into the same folder would mix with this run's
        for old in [*folder.glob("worst-*.png"), *folder.glob("best-*.png")]:
            old.unlink()
    written: list[Path] = []
    for e in entries:
        path = folder / f"{e.kind}-{e.position:03d}_{_safe_stem(e.query)}.png"
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            fh.write(e.png)
        e.file = path.relative_to(out).as_posix()
        written.append(path)
    rows = [
        {
            "kind": e.kind,
            "position": e.position,
            "query": e.query,
            "first_positive_rank": e.first_positive_rank,
            "top1_score": e.top1_score,
            "file": e.file,
        }
        for e in entries
    ]
    written.append(
        write_csv(rows, folder / INDEX_FILE, ["kind", "position", "query", "first_positive_rank", "top1_score", "file"])
    )
    return written
