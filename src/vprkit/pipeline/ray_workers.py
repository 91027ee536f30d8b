"""What runs on Ray's workers during a distributed build: reading an image, and a model replica that encodes.

Each replica loads the backbone, the aggregator and the map extensions once from the resolved
:class:`~vprkit.config.Config`, the map's vocabulary and the extensions' fitted state (shipped through
Ray's object store, so workers on other machines need no shared map folder), and encodes each image's
global descriptor *and* its extension payloads from the same dense features, as the single-process
build does.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import torch

from ..aggregation.options import AggregationOptions
from ..aggregation.vocabulary import make_aggregator
from ..config import Config
from ..device import module_device
from ..images import Batch, ImageSource
from .models import load_backbone, make_extensions, on_cpu
from .open import on_device

# Extension payloads travel from the replicas to the driver as one pickled blob per image: Ray Data
# would otherwise try to turn each image's dict of ragged arrays into an Arrow struct column.
PAYLOAD_PROTOCOL = pickle.HIGHEST_PROTOCOL


def read_image_row(row: dict[str, Any], source: ImageSource, config: Config, multiple: int) -> list[dict[str, Any]]:
    """One image, decoded and prepared as the single-process build prepares it, with its fingerprint.

    An unreadable image yields nothing: the finishing single-process pass reads it again and
    reports it (by name, in ``failures.json``), so the Ray pass needs no failure channel.
    """
    key = str(row["key"])
    try:
        pixels, _ = source.prepare(key, config.image, multiple)
        print_ = source.fingerprint(key)
    except Exception:  # noqa: BLE001 - reported by the finishing pass, which reads the image again
        return []
    return [
        {
            "key": key,
            "pixels": np.ascontiguousarray(pixels, np.uint8),
            "sha256": print_.sha256,
            "size": int(print_.size),
            "mtime": float(print_.mtime),
        }
    ]


class Encoder:
    """One model replica: the backbone, the aggregator and the map extensions, loaded once per Ray actor.

    Built from the resolved :class:`Config`, the map's vocabulary and the extensions' fitted state
    (all pickled by Ray), so an actor on any machine encodes exactly as the driver would.
    """

    def __init__(self, config: Config, vocabulary_ref: list, states_ref: list) -> None:
        import ray

        # the vocabulary and the extension states come through the object store by reference (held by the
        # driver for the whole run), so a restarted replica can fetch them again; the lists keep Ray from
        # resolving them early
        vocabulary = ray.get(vocabulary_ref[0])
        states: dict[str, dict[str, np.ndarray]] = ray.get(states_ref[0])
        self.config = config
        self.backbone = load_backbone(config)
        self.device = module_device(self.backbone)
        self.aggregator = on_device(
            make_aggregator(AggregationOptions.from_config(config), self.backbone, vocabulary), self.backbone
        )
        self.extensions = make_extensions(config, self.backbone, vocabulary)
        for group, ext in self.extensions.items():
            if states.get(group):
                ext.load_state(states[group])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = list(batch["pixels"])
        keys = [str(k) for k in batch["key"]]
        out: list[np.ndarray | None] = [None] * len(images)
        payloads: list[bytes] = [b""] * len(images)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):  # resize modes that keep the aspect give images of several sizes
            by_shape.setdefault(tuple(np.shape(img)), []).append(i)
        for rows in by_shape.values():
            # the same conversion as vprkit.images.iter_batches: uint8 HWC → float32 CHW in [0, 1]
            pixels = np.stack([images[i] for i in rows]).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
            with torch.inference_mode():
                feats = self.backbone(torch.from_numpy(pixels).to(self.device))
                vectors = self.aggregator(feats).float().cpu().numpy()
            for i, v in zip(rows, vectors):
                out[i] = v
            if self.extensions:  # the same per-image payloads, from the same features, as the single-process build
                # extensions read pixels and features only (no geometry: it is not shipped from the readers)
                part = Batch([keys[i] for i in rows], pixels, [None] * len(rows))
                per_image: list[dict[str, Any]] = [{} for _ in rows]
                for group, ext in self.extensions.items():
                    for d, payload in zip(per_image, ext.encode(part, on_cpu(feats))):
                        d[group] = payload
                for i, d in zip(rows, per_image):
                    payloads[i] = pickle.dumps(d, protocol=PAYLOAD_PROTOCOL)
        return {
            "key": batch["key"],
            "vector": np.stack(out),
            "sha256": batch["sha256"],
            "size": batch["size"],
            "mtime": batch["mtime"],
            "extras": np.array(payloads, dtype=object),
        }
