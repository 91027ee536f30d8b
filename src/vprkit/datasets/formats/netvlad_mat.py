"""Pittsburgh 30k/250k and Tokyo 24/7 / Tokyo Time Machine: NetVLAD's ``dbStruct`` ``.mat`` files.

Layout (Arandjelović et al., github.com/Relja/netvlad ``datasets/dbBase.m``, ``dbPitts.m``,
``dbTokyo247.m``): a MATLAB file ``<name>.mat`` (``pitts30k_test.mat``, ``pitts250k_val.mat``,
``tokyo247.mat`` …) holding one struct ``dbStruct`` with fields

- ``whichSet`` ('train' / 'val' / 'test'), ``dbImageFns`` and ``qImageFns`` (cell arrays of image
  paths relative to the database / query folder), ``utmDb`` and ``utmQ`` (2×N UTM easting, northing),
- ``numImages``, ``numQueries``, ``posDistThr`` (metres; 25), ``posDistSqThr``, ``nonTrivPosDistSqThr``,
- Tokyo's files also carry ``dbTimeStamp`` / ``qTimeStamp``.

AnyLoc's Oxford RobotCar part (``oxdatapart.mat``, ``custom_datasets/oxford_dataloader.py``) stores
``dbStruct`` as a 1×8 *cell array* instead: ``{dbImage, locDb, qImage, locQ, numDb, numQ,
posDistThr, posDistSqThr}`` with the names as a space-padded char matrix (spaces are removed, as
AnyLoc does) and N×2 locations; its images live under ``oxDataPart/``. Both forms are read.

The ``.mat`` sits in the dataset folder or its ``datasets/`` sub-folder. Database images are looked
up under ``images/`` (NetVLAD), ``database/`` or the dataset folder itself (pytorch-NetVlad); queries
under ``queries/`` (Pittsburgh), ``query/`` (Tokyo 24/7), ``queries_real/`` or the dataset folder —
each also one level down (OpenIBL's ``raw/pitts250k_test.mat`` + ``raw/Pittsburgh/images/``).
Positives: within ``posDistThr`` of the file (25 m) unless ``positive_dist_threshold`` is given.
Tokyo 24/7's standard test also merges the 12 cutouts of a panorama in the ranking (non-maximum
suppression); that is a ranking rule, not applied here, and is noted in the description.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.io import loadmat, whosmat

from ...errors import DatasetError
from ..base import RADIUS_OPTIONS, Dataset, radius_option, register_adapter
from ..ground_truth import GroundTruth
from .common import require_files

STRUCT_NAME = "dbStruct"
REQUIRED_FIELDS = ("dbImageFns", "utmDb", "qImageFns", "utmQ")
MAT_FOLDERS = ("", "datasets")
DB_FOLDERS = ("images", "database", "oxDataPart", "")
QUERY_FOLDERS = ("queries", "query", "queries_real", "oxDataPart", "")
# AnyLoc's cell-array dbStruct, by position (custom_datasets/oxford_dataloader.py parse_dbStruct).
CELL_FIELDS = ("dbImage", "locDb", "qImage", "locQ", "numDb", "numQ", "posDistThr", "posDistSqThr")
NMS_NOTE = "Tokyo 24/7's standard test merges the 12 cutouts of a panorama in the ranking (not applied)"


@dataclass
class DbStruct:
    """The fields of a NetVLAD ``dbStruct`` (image names as given, UTM as N×2)."""

    path: Path
    which_set: str
    db_images: list[str]
    db_utm: np.ndarray
    q_images: list[str]
    q_utm: np.ndarray
    pos_dist_thr: float | None
    fields: tuple[str, ...]
    db_timestamps: np.ndarray | None = None
    q_timestamps: np.ndarray | None = None


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    arr = np.asarray(value, dtype=object).ravel()
    out = []
    for v in arr:
        while isinstance(v, np.ndarray) and v.dtype == object and v.size == 1:
            v = v.item()
        out.append(str(v.item() if isinstance(v, np.ndarray) and v.size == 1 else v).strip())
    return out


def _utm(value, n: int, name: str, path: Path) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.size != 2 * n:
        raise DatasetError(f"{path}: {STRUCT_NAME}.{name} has {arr.size} numbers, expected 2×{n} (easting, northing)")
    if arr.ndim == 2 and arr.shape == (n, 2) and (n != 2 or name.startswith("loc")):
        return arr
    return arr.reshape(2, n).T  # MATLAB stores 2×N


def read_dbstruct(mat_path: str | os.PathLike) -> DbStruct:
    """Read a NetVLAD ``dbStruct`` .mat file (MATLAB v5; v7.3 files are refused with a hint)."""
    path = Path(mat_path)
    try:
        mat = loadmat(path, squeeze_me=True, struct_as_record=False)
    except NotImplementedError as e:  # MATLAB v7.3 (HDF5)
        raise DatasetError(
            f"{path} is a MATLAB v7.3 file; re-save it with save(..., '-v7') to read it here ({e})"
        ) from e
    except Exception as e:  # scipy raises ValueError/TypeError/MatReadError on damaged files
        raise DatasetError(f"cannot read {path} as a MATLAB .mat file: {e}") from e
    if STRUCT_NAME not in mat:
        names = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise DatasetError(f"{path} has no variable {STRUCT_NAME} (variables: {names}); not a NetVLAD dataset spec")
    st = mat[STRUCT_NAME]
    if isinstance(st, np.ndarray) and st.dtype == object and st.size >= len(CELL_FIELDS):
        return _from_cell(path, st.ravel())
    fields = tuple(getattr(st, "_fieldnames", ()) or ())
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    if missing:
        raise DatasetError(f"{path}: {STRUCT_NAME} lacks field(s) {', '.join(missing)} (has {', '.join(fields)})")
    db = _strings(st.dbImageFns)
    q = _strings(st.qImageFns)
    thr = (
        float(np.asarray(st.posDistThr).ravel()[0])
        if "posDistThr" in fields and np.asarray(st.posDistThr).size
        else None
    )
    which = str(st.whichSet) if "whichSet" in fields else ""

    def stamps(name: str, n: int):
        if name not in fields:
            return None
        a = np.asarray(getattr(st, name), dtype=np.float64).ravel()
        return a if a.size == n else None

    return DbStruct(
        path,
        which,
        db,
        _utm(st.utmDb, len(db), "utmDb", path),
        q,
        _utm(st.utmQ, len(q), "utmQ", path),
        thr,
        fields,
        stamps("dbTimeStamp", len(db)),
        stamps("qTimeStamp", len(q)),
    )


def _from_cell(path: Path, cells: np.ndarray) -> DbStruct:
    db = [n.replace(" ", "") for n in _strings(cells[0])]
    q = [n.replace(" ", "") for n in _strings(cells[2])]
    thr = np.asarray(cells[6], dtype=np.float64).ravel()
    return DbStruct(
        path,
        "",
        db,
        _utm(cells[1], len(db), "locDb", path),
        q,
        _utm(cells[3], len(q), "locQ", path),
        float(thr[0]) if thr.size else None,
        CELL_FIELDS,
    )


def _mat_files(root: Path) -> list[Path]:
    found = []
    for sub in MAT_FOLDERS:
        folder = root / sub if sub else root
        if not folder.is_dir():
            continue
        for p in sorted(folder.glob("*.mat")):
            try:
                if any(name == STRUCT_NAME for name, _, _ in whosmat(p)):
                    found.append(p)
            except Exception:  # not a v5 .mat, or damaged: not ours to detect
                continue
    return found


def _choose_mat(root: Path, split: str | None) -> Path:
    files = _mat_files(root)
    if split is not None:
        direct = Path(split)
        if direct.is_file():
            return direct
        hits = [p for p in files if p.stem == split or p.name == split]
        if not hits:
            raise DatasetError(
                f"{root}: no {STRUCT_NAME} file named {split!r}; available: {', '.join(p.stem for p in files) or 'none'}"
            )
        return hits[0]
    if not files:
        raise DatasetError(
            f"{root}: no .mat file with a {STRUCT_NAME} in it (looked in {root} and {root / 'datasets'})"
        )
    if len(files) == 1:
        return files[0]
    tests = [p for p in files if p.stem.endswith("_test") or p.stem == "tokyo247"]
    if len(tests) == 1:
        return tests[0]
    raise DatasetError(
        f"{root} has several dataset specs ({', '.join(p.stem for p in files)}); choose one with split=NAME"
    )


def _image_folder(root: Path, candidates: tuple[str, ...], names: list[str], role: str, mat: Path) -> Path:
    # The images sit beside the .mat, or one level down (OpenIBL's raw/Pittsburgh/images, raw/tokyo247/query).
    bases = [root] + sorted(
        d for d in root.iterdir() if d.is_dir() and d.name not in MAT_FOLDERS and not d.name.startswith(".")
    )
    for base in bases:
        for sub in candidates:
            folder = base / sub if sub else base
            if names and (folder / names[0]).is_file():
                require_files(folder, names, role, mat)
                return folder
    tried = ", ".join(c + "/" for c in candidates if c)
    raise DatasetError(
        f"{mat}: the first {role} image {names[0] if names else '(none)'!r} is not under {root} or a sub-folder "
        f"of it, directly or in {tried}"
    )


@register_adapter(
    "netvlad-mat",
    5,
    ("split",) + RADIUS_OPTIONS,
    "NetVLAD dbStruct .mat (Pittsburgh 30k/250k, Tokyo 24/7, Tokyo TM; AnyLoc's Oxford oxdatapart.mat): "
    "<name>.mat in the folder or datasets/, database images under images/ (or database/, oxDataPart/, the folder), "
    "queries under queries/, query/, queries_real/ or oxDataPart/; split=pitts30k_test picks the .mat",
    "radius posDistThr of the file (25 m)",
)
def _netvlad_mat():
    def detect(path: Path) -> bool:
        return any(
            p.suffix == ".mat" for sub in MAT_FOLDERS for p in ((path / sub) if sub else path).glob("*.mat")
        ) and bool(_mat_files(path))

    def load(
        path: Path, split: str | None = None, positive_dist_threshold: float | None = None, radius: float | None = None
    ) -> Dataset:
        mat = _choose_mat(path, split)
        st = read_dbstruct(mat)
        file_default = st.pos_dist_thr if st.pos_dist_thr and st.pos_dist_thr > 0 else 25.0
        r = radius_option(positive_dist_threshold, radius, default=file_default)
        db_dir = _image_folder(path, DB_FOLDERS, st.db_images, "database", mat)
        q_dir = _image_folder(path, QUERY_FOLDERS, st.q_images, "query", mat)
        gt = GroundTruth.from_radius(st.q_utm, st.db_utm, r)
        rule = dict(gt.rule)
        rule["source"] = (
            f"{mat.name} posDistThr"
            if positive_dist_threshold is None and radius is None and st.pos_dist_thr
            else "option"
        )
        description = f"{mat.name} (whichSet {st.which_set or '?'})"
        if mat.stem.lower().startswith("tokyo247"):
            description += "; " + NMS_NOTE
        ds = Dataset(
            path.name,
            db_dir,
            st.db_images,
            q_dir,
            st.q_images,
            gt,
            st.db_utm,
            st.q_utm,
            description=description,
            layout="netvlad-mat",
            ground_truth_rule=rule,
        )
        if st.db_timestamps is not None:
            ds.database_metadata["timestamp"] = st.db_timestamps
        if st.q_timestamps is not None:
            ds.query_metadata["timestamp"] = st.q_timestamps
        return ds

    return detect, load
