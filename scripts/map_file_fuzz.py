"""The ``map-files`` campaign of ``scripts/fuzz_inputs.py``: damaged manifests and derived files of a real map.

A small map is built once with the library from Corridor reference images (synthetic poses 10 m apart),
made to hold every kind of file a served map holds: a compressed index in shards with ``descriptors.npy``
for re-scoring (``vprkit map compress``), ``calibration.json`` (a writable open), a place added live
(``live/append-*.h5``, ``live-images/``) and saved re-ranking state (``vprkit rerank prepare``). Two more
maps give files to swap in: the same preset over other images, and another preset over the same images.

Each input copies the template, damages one file and opens the copy (read-only like ``localize``, or
writable like ``serve``), then localises a map image (re-ranked when the damaged file is re-ranking
state). First every (file, damage) pair is tried once, in order; then random pairs with random
parameters until the time is up. An outcome is:

- ``refused``: a :class:`~vprkit.errors.VPRKitError` with a one-line message;
- ``correct``: the image finds itself at top-1 (cosine ≥ 0.99), no place twice, the pristine map's
  confidence (±0.1), and the answer serialises as strict JSON (``allow_nan=False``);
- a finding: any other exception (a traceback for the user), a multi-line error, or a silent wrong
  answer. The run exits 1 when there is a finding.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

MAP_IMAGES = 12  # rows enough for the confidence's calibration (rows outside each row's window remain)
SPACING_M = 10.0
QUERY_ROW = 3
LIVE_KEY = "live-added.jpg"
LIVE_IMAGE = 60  # Corridor reference added live (not among the map's images)
RERANK = "speed"
COMPRESSION = {"factory": "SQ8", "rescore": 5, "shard_rows": 6}
PRESET = "effnet-vlad"  # a vocabulary (vocabulary.npz) and a small backbone: templates in seconds
OTHER_PRESET = "effnet-gem"  # another descriptor dimension
IMAGE_SIZE = (120, 160)  # small frames: the campaign is about the files, not the model
COSINE_SELF = 0.99
CONFIDENCE_TOLERANCE = 0.1
# The files damaged: name → how to find it in a map folder (a glob; the first match in sorted order).
JSON_TARGETS = {
    "map.json": "map.json",
    "index.json": "index.json",
    "build.json": "build.json",
    "calibration.json": "calibration.json",
}
BINARY_TARGETS = {
    "descriptors.npy": "descriptors.npy",
    "index shard": "index-shards/*.faiss",
    "index.trained.faiss": "index.trained.faiss",
    "store.h5": "store.h5",
    "append file": "live/append-*.h5",
    "re-ranking state": "extensions/*/state.npz",
    "re-ranking rows": "extensions/*/rows-*.npz",
    "vocabulary.npz": "vocabulary.npz",
}
RERANK_TARGETS = ("re-ranking state", "re-ranking rows")
# Values a JSON edit puts in place of a leaf.
JSON_VALUES: list[Any] = [None, -1, 0, 1, 2**63, 1e308, -1e308, "x", "", "../x", "/etc/hostname", [], {}, True, 0.5]
SHARD_PATHS = ["../x", "../../x", "/etc/hostname", "index-shards/../../x", "index-shards/missing.faiss"]


# ---- the template maps -------------------------------------------------------------------------------
def _poses_csv(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "poses.csv"
    path.write_text("image,easting,northing\n" + "".join(f"{i:07d}.jpg,{i * SPACING_M},0\n" for i in range(count)))
    return path


def _build(out: Path, ref: Path, keys: list[str], preset: str, poses: Path, rerank: bool) -> Path:
    """Build, compress, calibrate, add a place live and (``rerank``) prepare re-ranking: every kind of map file."""
    from vprkit import pipeline
    from vprkit.images import FolderImages
    from vprkit.pipeline.live import LiveMap
    from vprkit.pipeline.scale import compress_map
    from vprkit.presets import get_rerank_config, resolve

    config = resolve(preset, image_size=IMAGE_SIZE)
    pipeline.build_map(FolderImages(ref, keys), out, config, poses=poses, progress=False, log=lambda _: None)
    compress_map(out, COMPRESSION["factory"], rescore=COMPRESSION["rescore"], shard_rows=COMPRESSION["shard_rows"])
    live = LiveMap.open(out)  # a writable open writes calibration.json
    live.add_place((ref / f"{LIVE_IMAGE:07d}.jpg").read_bytes(), LIVE_KEY, {"easting": 5.0, "northing": 0.0})
    if rerank:
        m = pipeline.open_map(out, read_only=True)
        reranker = pipeline.get_reranker(m, get_rerank_config(RERANK))
        try:
            reranker.prepare(progress=False)
        finally:
            reranker.close()
    return out


def cache_backbones() -> None:
    """Load each backbone once for the whole run: ``open_map`` would load it again for every input."""
    from vprkit.pipeline import open as open_module

    loaded: dict[str, Any] = {}
    original = open_module.load_backbone

    def cached(config):
        key = repr((config.backbone, config.backbone_options, config.device, getattr(config, "weights", None)))
        if key not in loaded:
            loaded[key] = original(config)
        return loaded[key]

    open_module.load_backbone = cached


@dataclass
class Templates:
    map: Path
    other: Path
    other_preset: Path
    query: Path  # a map image (its key is its name)
    pristine: dict[str, dict]  # "plain" / "rerank" → the pristine answer


def build_templates(root: Path, data: Path) -> Templates:
    ref = data / "corridor" / "ref"
    keys = sorted(p.name for p in ref.glob("*.jpg"))
    poses = _poses_csv(root, len(keys))
    preset = PRESET
    base = _build(root / "a" / "b" / "template", ref, keys[:MAP_IMAGES], preset, poses, rerank=True)
    other = _build(root / "other", ref, keys[MAP_IMAGES : 2 * MAP_IMAGES], preset, poses, rerank=True)
    other_preset = _build(root / "other-preset", ref, keys[:MAP_IMAGES], OTHER_PRESET, poses, rerank=False)
    query = ref / keys[QUERY_ROW]
    pristine = {mode: _answer(base, query, read_only=True, rerank=mode == "rerank") for mode in ("plain", "rerank")}
    return Templates(base, other, other_preset, query, pristine)


def _answer(map_dir: Path, query: Path, read_only: bool, rerank: bool) -> dict:
    """The map's answer to ``query`` as the JSON the CLI prints (serialised strictly: NaN / ±inf raise)."""
    from vprkit import pipeline

    m = pipeline.open_map(map_dir, read_only=read_only)
    result = pipeline.localize(m, [str(query)], top_k=3, rerank=RERANK if rerank else "none")[0]
    return json.loads(json.dumps(result.to_dict(), allow_nan=False))


# ---- damage ------------------------------------------------------------------------------------------
def _find(map_dir: Path, pattern: str) -> Path | None:
    found = sorted(map_dir.glob(pattern))
    return found[0] if found else None


def _truncate(path: Path, rng: random.Random, _: Templates) -> str:
    raw = path.read_bytes()
    keep = rng.randrange(len(raw)) if raw else 0
    path.write_bytes(raw[:keep])
    return f"truncated to {keep} of {len(raw)} bytes"


def _bitflip(path: Path, rng: random.Random, _: Templates) -> str:
    raw = bytearray(path.read_bytes())
    if not raw:
        return "empty file (nothing to flip)"
    flips = [rng.randrange(len(raw) * 8) for _ in range(rng.choice([1, 1, 2, 8, 64]))]
    for bit in flips:
        raw[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(raw))
    return f"{len(flips)} bit(s) flipped, first at byte {flips[0] // 8}"


def _empty(path: Path, rng: random.Random, _: Templates) -> str:
    path.write_bytes(b"")
    return "emptied"


def _swap(source_of: Callable[[Templates], Path]) -> Callable[[Path, random.Random, Templates], str]:
    def swap(path: Path, rng: random.Random, t: Templates) -> str:
        root = source_of(t)
        pattern = TARGET_PATTERNS[_target_of(path, t)]
        matches = sorted(root.glob(pattern))
        same = root / path.relative_to(_map_root(path))
        source = same if same.exists() else (matches[0] if matches else None)
        if source is None:
            raise LookupError(f"{root.name} has no {pattern}")
        shutil.copy2(source, path)
        return f"replaced by {root.name}/{source.relative_to(root)}"

    return swap


def _json_edit(path: Path, rng: random.Random, _: Templates) -> str:
    doc = json.loads(path.read_text())
    leaves = list(_leaves(doc, ()))
    if not leaves:
        return "no leaf to edit"
    where = rng.choice(leaves)
    value = rng.choice(JSON_VALUES)
    parent = doc
    for step in where[:-1]:
        parent = parent[step]
    parent[where[-1]] = value
    path.write_text(json.dumps(doc))
    return f"{'/'.join(map(str, where))} = {value!r}"


def _leaves(node: Any, at: tuple) -> Any:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, at + (k,))
    elif isinstance(node, list) and node:
        for i, v in enumerate(node[:8]):
            yield from _leaves(v, at + (i,))
    elif at:
        yield at


def _shard_path(path: Path, rng: random.Random, t: Templates) -> str:
    """index.json: a shard's file outside the map folder; what it names holds a shard of another map."""
    doc = json.loads(path.read_text())
    shards = doc.get("shards") or []
    if not shards:
        raise LookupError("index.json lists no shards")
    new = rng.choice(SHARD_PATHS + [str(_find(t.other, BINARY_TARGETS["index shard"]))])
    i = rng.randrange(len(shards))
    shards[i]["file"] = new
    foreign = _find(t.other, BINARY_TARGETS["index shard"])
    for outside in (path.parent.parent / "x", path.parent.parent.parent / "x"):
        shutil.copy2(foreign, outside)
    path.write_text(json.dumps(doc))
    return f"shards[{i}].file = {new!r}"


def _duplicate_append(path: Path, rng: random.Random, _: Templates) -> str:
    digits = len(path.stem) - len("append-")
    number = int(path.stem[len("append-") :]) + 1
    copy = path.with_name(f"append-{number:0{digits}d}.h5")
    shutil.copy2(path, copy)
    return f"{path.name} copied to {copy.name} (its keys twice)"


DAMAGES: dict[str, Callable[[Path, random.Random, Templates], str]] = {
    "truncate": _truncate,
    "bit flips": _bitflip,
    "empty": _empty,
    "swap: another map": _swap(lambda t: t.other),
    "swap: another preset": _swap(lambda t: t.other_preset),
}
TARGET_PATTERNS = {**JSON_TARGETS, **BINARY_TARGETS}
EXTRA_DAMAGES = {"json edit": (_json_edit, tuple(JSON_TARGETS)), "shard path": (_shard_path, ("index.json",))}
EXTRA_DAMAGES["duplicate keys"] = (_duplicate_append, ("append file",))


def _map_root(path: Path) -> Path:
    while not (path / "map.json").exists() and path != path.parent:
        path = path.parent
    return path


def _target_of(path: Path, t: Templates) -> str:
    rel = path.relative_to(_map_root(path))
    return next(name for name, pattern in TARGET_PATTERNS.items() if rel.match(pattern))


def combos(template: Path) -> list[tuple[str, str]]:
    """Every (file, damage) pair that applies to ``template``."""
    present = [name for name, pattern in TARGET_PATTERNS.items() if _find(template, pattern) is not None]
    out = [(name, damage) for name in present for damage in DAMAGES]
    out += [(name, damage) for damage, (_, names) in EXTRA_DAMAGES.items() for name in names if name in present]
    return out


def damage_fn(damage: str) -> Callable[[Path, random.Random, Templates], str]:
    return DAMAGES[damage] if damage in DAMAGES else EXTRA_DAMAGES[damage][0]


# ---- one input ---------------------------------------------------------------------------------------
@dataclass
class Outcome:
    target: str
    damage: str
    detail: str
    read_only: bool
    kind: str  # refused | correct | finding | skipped
    message: str = ""


def judge(answer: dict, key: str, pristine: dict) -> str | None:
    """None when ``answer`` is the correct one for map image ``key``, else what is wrong."""
    matches = answer.get("matches") or []
    ids = [m.get("image") for m in matches]
    if not ids:
        return f"no matches ({answer.get('error')})"
    if ids[0] != key:
        return f"top-1 {ids[0]} instead of {key}"
    if len(set(ids)) != len(ids):
        return f"a place returned twice: {ids}"
    cosine = matches[0].get("cosine")
    if cosine is None or not cosine >= COSINE_SELF:
        return f"top-1 cosine {cosine} for an exact match"
    want = (pristine.get("estimate") or {}).get("confidence")
    got = (answer.get("estimate") or {}).get("confidence")
    if want is not None and (got is None or abs(got - want) > CONFIDENCE_TOLERANCE):
        return f"confidence {got} for an exact match (pristine: {want})"
    return None


def try_one(t: Templates, work: Path, target: str, damage: str, rng: random.Random) -> Outcome:
    from vprkit.errors import VPRKitError

    copy = work / "a" / "b" / "map"
    shutil.rmtree(work / "a", ignore_errors=True)
    shutil.copytree(t.map, copy)
    path = _find(copy, TARGET_PATTERNS[target])
    read_only = rng.random() < 0.5
    try:
        detail = damage_fn(damage)(path, rng, t)
    except LookupError as exc:
        return Outcome(target, damage, str(exc), read_only, "skipped")
    rerank = target in RERANK_TARGETS
    try:
        answer = _answer(copy, t.query, read_only, rerank)
    except VPRKitError as exc:
        text = str(exc).strip()
        kind = "finding" if "\n" in text else "refused"
        return Outcome(target, damage, detail, read_only, kind, f"{type(exc).__name__}: {text[:300]}")
    except Exception as exc:  # noqa: BLE001 - the finding: anything but the project's own one-line error
        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno} in {tb[-1].name}" if tb else "?"
        return Outcome(target, damage, detail, read_only, "finding", f"{type(exc).__name__} at {where}: {exc}"[:300])
    wrong = judge(answer, t.query.name, t.pristine["rerank" if rerank else "plain"])
    if wrong is not None:
        return Outcome(target, damage, detail, read_only, "finding", f"silent wrong answer: {wrong}")
    return Outcome(target, damage, detail, read_only, "correct")


# ---- the campaign ------------------------------------------------------------------------------------
def run_map_file_campaign(seconds: float, seed: int, data: Path | None, json_out: Path | None) -> int:
    """Every (file, damage) pair once, then random ones for ``seconds``; print the tally and each finding."""
    repo = Path(__file__).resolve().parents[1]
    data = data or Path(os.environ.get("VPRKIT_DATA", repo.parent / "shared" / "datasets"))
    root = Path(tempfile.mkdtemp(prefix="vprkit-fuzz-mapfiles-"))
    try:
        cache_backbones()
        start = time.monotonic()
        templates = build_templates(root / "templates", data)
        print(f"map-files: templates built in {time.monotonic() - start:.0f} s", flush=True)
        rng = random.Random(seed)
        pairs = combos(templates.map)
        outcomes = [try_one(templates, root / "work", target, damage, rng) for target, damage in pairs]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            outcomes.append(try_one(templates, root / "work", *rng.choice(pairs), rng))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report(outcomes, json_out)


def report(outcomes: list[Outcome], json_out: Path | None) -> int:
    tally: dict[tuple[str, str], dict[str, int]] = {}
    for o in outcomes:
        counts = tally.setdefault((o.target, o.damage), {"refused": 0, "correct": 0, "finding": 0, "skipped": 0})
        counts[o.kind] += 1
    findings = [o for o in outcomes if o.kind == "finding"]
    print(f"map-files: {len(outcomes)} damaged maps, {len(tally)} (file, damage) pairs, {len(findings)} finding(s)")
    for (target, damage), c in sorted(tally.items()):
        print(
            f"  {target:20} {damage:22} refused {c['refused']:3}  correct {c['correct']:3}  findings {c['finding']:3}"
        )
    seen = set()
    for o in findings:
        if (o.target, o.damage, o.message[:60]) in seen:
            continue
        seen.add((o.target, o.damage, o.message[:60]))
        mode = "read-only" if o.read_only else "writable"
        print(f"  FINDING [{o.target} / {o.damage}: {o.detail}; {mode} open] {o.message}")
    if json_out is not None:
        json_out.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    return 1 if findings else 0
