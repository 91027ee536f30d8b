"""Seeded random weights and images shared by the zoo's reference recordings and its tests.

Imported both by vprkit's tests (torch 2.13, ``.venv``) and by the scripts that run the *official* code
(``scripts/zoo_reference/``, torch 2.14 + torchvision, ``.venv-ref``), so it imports neither vprkit nor
torch: numpy's ``default_rng`` (PCG64) gives the same numbers in both. Weights are drawn per parameter
name in sorted order, scaled so a deep random network keeps finite, non-degenerate activations
(fan-in scaling for weights, BatchNorm statistics near identity, LayerNorm gains near 1).
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable, Mapping, Sequence

import numpy as np

REL_TOLERANCE = 1e-5  # the bar: max |ours − official| / max |official| per descriptor batch


def _scaled(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return np.zeros(shape, dtype=np.int64)
    if leaf == "running_var":
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if leaf == "running_mean":
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    if len(shape) <= 1 and leaf in ("weight", "gamma"):  # norm gains, LayerScale
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if len(shape) <= 1:  # biases, scalars (GeM p, dustbin score …)
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)
    if "token" in name or "pos_embed" in name or "queries" in name or "centroid" in name:
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def seeded_state_dict(
    shapes: Mapping[str, Sequence[int]], seed: int = 0, overrides: Mapping[str, float] | None = None
) -> dict[str, np.ndarray]:
    """Random tensors for every ``name → shape`` (sorted by name, one generator); ``overrides`` fill a
    parameter with a constant (e.g. GeM's ``p`` = 3)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(int(s) for s in shapes[name])
        out[name] = _scaled(name, shape, rng)
        if overrides and name in overrides:
            out[name] = np.full(shape, overrides[name], dtype=out[name].dtype)
    return out


def seeded_images(sizes: Iterable[Sequence[int]], batch: int = 2, seed: int = 1) -> list[np.ndarray]:
    """One ``batch×3×H×W`` float32 array of smooth random pixels in [0, 1] per (H, W): low-frequency
    patterns plus noise, so the networks see image-like structure rather than white noise."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        ys, xs = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        imgs = []
        for _ in range(batch):
            f = rng.uniform(1, 6, (3, 2))
            ph = rng.uniform(0, 2 * np.pi, (3, 2))
            base = 0.5 + 0.25 * np.sin(2 * np.pi * f[:, :1, None] * xs + ph[:, :1, None]) * np.cos(
                2 * np.pi * f[:, 1:, None] * ys + ph[:, 1:, None]
            )
            imgs.append(np.clip(base + 0.1 * rng.standard_normal((3, h, w)), 0, 1))
        out.append(np.stack(imgs).astype(np.float32))
    return out


def checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """A digest of named arrays (to prove both sides drew the same weights)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def relative_difference(ours: np.ndarray, official: np.ndarray) -> float:
    """max |ours − official| / max |official| (the descriptors are L2-normalised, so this is per-entry relative)."""
    ours, official = np.asarray(ours, np.float64), np.asarray(official, np.float64)
    if ours.shape != official.shape:
        raise AssertionError(f"shape {ours.shape} vs official {official.shape}")
    return float(np.abs(ours - official).max() / max(np.abs(official).max(), 1e-30))


def write_fixture(path: str, meta: Mapping, outputs: Mapping[str, np.ndarray]) -> None:
    """``meta`` (JSON: official repository and commit, method, the official key → shape list, weight and
    image seeds, image sizes, the weights' :func:`checksum` …) and the official outputs, by name
    (e.g. ``"322x322"``), in one compressed ``.npz``. Inputs are not stored: :func:`seeded_images`
    redraws them from the seed."""
    arrays = {"meta": np.array(json.dumps(meta, sort_keys=True))}
    arrays.update({f"output/{k}": np.asarray(v, np.float32) for k, v in outputs.items()})
    np.savez_compressed(path, **arrays)


def read_fixture(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, {name: official output})`` of a fixture written by :func:`write_fixture`."""
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        return meta, {k.removeprefix("output/"): z[k] for k in z.files if k.startswith("output/")}
