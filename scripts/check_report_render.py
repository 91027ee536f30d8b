#!/usr/bin/env python3
"""Render an evaluation report (``report.html`` of ``vprkit eval --out``) in headless Chromium and check it.

    scripts/check_report_render.py RUN/report.html --out shot.png [--width 1280 --height 4000]

Checks, printing one line each and exiting 1 if any fails:

1. the HTML has every expected section (``results``, ``recall-curve``, ``pr-curve``, ``galleries``,
   ``per-query``, ``ground-truth``, ``timing``, ``settings``, ``environment``, ``software``), at least
   one table, and refers to no external file, script or stylesheet;
2. every embedded image is a base64 PNG that decodes, and is larger than a thumbnail;
3. Chromium (``chromium --headless --screenshot``; ``--no-sandbox`` when run as root) renders the page
   to a PNG that is not blank: enough distinct colours and non-white pixels.

Chromium is looked for as ``chromium``, ``chromium-browser``, ``google-chrome`` (or ``$CHROMIUM``);
Debian: ``apt-get install -y chromium``.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

EXPECTED_SECTIONS = (
    "results",
    "recall-curve",
    "pr-curve",
    "galleries",
    "per-query",
    "ground-truth",
    "timing",
    "settings",
    "environment",
    "software",
)
MIN_FIGURE_SIDE = 50
MIN_DISTINCT_COLOURS = 64
MIN_INK_FRACTION = 0.02


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[dict[str, str]] = []
        self.tables = 0
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "section":
            self.sections.append(a.get("id", ""))
        elif tag == "img":
            self.images.append(a)
        elif tag == "table":
            self.tables += 1
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.external.append(f"<{tag}>")
        for attr in ("src", "href"):
            v = a.get(attr, "")
            if v and not v.startswith(("data:", "#")):
                self.external.append(v)


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def screenshot(html: Path, out: Path, width: int, height: int, chromium: str) -> None:
    with tempfile.TemporaryDirectory(prefix="vprkit-chromium-") as profile:
        cmd = [
            chromium,
            "--headless",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={out}",
            f"--window-size={width},{height}",
            "--default-background-color=ffffffff",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--no-sandbox")
        cmd.append(html.resolve().as_uri())
        subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--out", type=Path, default=Path("report-screenshot.png"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=4000)
    ap.add_argument("--no-browser", action="store_true", help="Only check the HTML and its images.")
    args = ap.parse_args(argv)

    import numpy as np
    from PIL import Image

    failures = []

    def check(ok: bool, what: str) -> None:
        print(("ok    " if ok else "FAIL  ") + what)
        if not ok:
            failures.append(what)

    text = args.report.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    missing = [s for s in EXPECTED_SECTIONS if s not in page.sections]
    check(not missing, f"sections present ({len(page.sections)})" + (f"; missing {missing}" if missing else ""))
    check(page.tables > 0, f"{page.tables} tables")
    check(not page.external, "self-contained" + (f"; refers to {page.external[:5]}" if page.external else ""))
    sizes = []
    for img in page.images:
        src = img.get("src", "")
        try:
            if not src.startswith("data:image/png;base64,"):
                raise ValueError("not a base64 PNG data URI")
            im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
            im.load()
            sizes.append(im.size)
        except Exception as exc:  # noqa: BLE001 - report every undecodable image
            check(False, f"image {img.get('alt', '?')!r} decodes ({exc})")
    check(
        bool(sizes) and len(sizes) == len(page.images),
        f"{len(sizes)} embedded PNGs decode: "
        + ", ".join(f"{w}×{h}" for w, h in sizes[:6])
        + (" …" if len(sizes) > 6 else ""),
    )
    small = [s for s in sizes if min(s) < MIN_FIGURE_SIDE]
    check(not small, f"no image smaller than {MIN_FIGURE_SIDE} px" + (f"; {small}" if small else ""))
    check(len(text) < 50_000_000, f"report size {len(text) / 1e6:.1f} MB")

    if not args.no_browser:
        chromium = find_chromium()
        if chromium is None:
            check(False, "chromium found (apt-get install -y chromium)")
        else:
            try:
                screenshot(args.report, args.out, args.width, args.height, chromium)
            except (subprocess.SubprocessError, OSError) as exc:
                err = getattr(exc, "stderr", b"") or b""
                check(False, f"chromium rendered the page ({exc}; {err.decode(errors='replace')[-300:]})")
            else:
                shot = np.asarray(Image.open(args.out).convert("RGB"))
                ink = float((shot.min(axis=-1) < 240).mean())
                colours = len(np.unique(shot.reshape(-1, 3)[:: max(1, shot.size // 3 // 200_000)], axis=0))
                check(
                    shot.shape[0] >= args.height // 2 and shot.shape[1] >= args.width // 2,
                    f"screenshot {args.out} is {shot.shape[1]}×{shot.shape[0]}",
                )
                check(ink >= MIN_INK_FRACTION, f"screenshot not blank: {100 * ink:.1f} % non-white pixels")
                check(colours >= MIN_DISTINCT_COLOURS, f"screenshot has {colours} distinct colours (figures, photos)")
    print("PASS" if not failures else f"FAILED: {len(failures)} check(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
