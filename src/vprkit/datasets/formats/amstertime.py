"""AmsterTime (Yildiz et al., CVPRW 2022): archival photos of Amsterdam paired with street views.

On disk: ``old/`` (archival images: the queries) and ``new/`` (street-level images: the database),
one pair per place sharing a file stem (``old/0001.jpg`` ↔ ``new/0001.png``). Positive: the
paired image only (the benchmark's retrieval task); unpaired files stay in as distractors.
``queries=new`` swaps the roles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import ConfigError, DatasetError
from ..base import Dataset, register_adapter
from ..ground_truth import GroundTruth
from .common import images_natural

OLD, NEW = "old", "new"


@register_adapter(
    "amstertime",
    12,
    ("queries",),
    "AmsterTime: old/ (archival, queries) + new/ (street view, database), pairs share a file stem",
    "the paired image (same stem)",
)
def _amstertime():
    def detect(path: Path) -> bool:
        return (path / OLD).is_dir() and (path / NEW).is_dir()

    def load(path: Path, queries: str = OLD) -> Dataset:
        if queries not in (OLD, NEW):
            raise ConfigError(f"AmsterTime queries must be {OLD!r} or {NEW!r}, got {queries!r}")
        database = NEW if queries == OLD else OLD
        q = images_natural(path / queries, "query")
        db = images_natural(path / database, "database")
        index: dict[str, int] = {}
        for i, k in enumerate(db):
            stem = k.rsplit(".", 1)[0]
            if stem in index:
                raise DatasetError(f"{path / database}: two images share the stem {stem!r}; pairs must be unique")
            index[stem] = i
        positives = [
            np.asarray([index[k.rsplit(".", 1)[0]]] if k.rsplit(".", 1)[0] in index else [], dtype=np.int64) for k in q
        ]
        if not any(p.size for p in positives):
            raise DatasetError(f"{path}: no image of {queries}/ has a partner with the same name in {database}/")
        rule = {"kind": "pairs", "match": "file stem", "source": "AmsterTime old/new pairs"}
        gt = GroundTruth(positives, len(db), source="paired image (same file stem)", rule=dict(rule))
        return Dataset(
            path.name,
            path / database,
            db,
            path / queries,
            q,
            gt,
            layout="amstertime",
            ground_truth_rule=rule,
            description=f"queries {queries}/, database {database}/",
        )

    return detect, load
