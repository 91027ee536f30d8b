"""Standard benchmark formats, each on a tiny fixture written here in that format's own layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.io import loadmat, savemat

from vprkit.datasets import DATASET_ADAPTERS, describe_adapters, detect_layout, load_dataset
from vprkit.datasets.formats.baidu import read_camera_file
from vprkit.datasets.formats.msls import POST_COLUMNS, RAW_COLUMNS, SEQ_COLUMNS
from vprkit.datasets.formats.netvlad_mat import read_dbstruct
from vprkit.errors import ConfigError, DatasetError
from helpers import tiny_image

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"


def _cell(names):
    """A MATLAB N×1 cell array of strings, as savemat writes numpy object arrays."""
    arr = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        arr[i, 0] = n
    return arr


# --- Pittsburgh / Tokyo dbStruct ---------------------------------------------------------------


def _write_dbstruct(path: Path, db, utm_db, q, utm_q, which="test", thr=25.0, extra=None):
    st = {
        "whichSet": which,
        "dbImageFns": _cell(db),
        "utmDb": np.asarray(utm_db, dtype=float).T,  # 2×N as in the original files
        "qImageFns": _cell(q),
        "utmQ": np.asarray(utm_q, dtype=float).T,
        "numImages": float(len(db)),
        "numQueries": float(len(q)),
        "posDistThr": thr,
        "posDistSqThr": thr**2,
        "nonTrivPosDistSqThr": 100.0,
    }
    st.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"dbStruct": st})


PITTS_DB = ["000/000000_pitch1_yaw1.jpg", "000/000000_pitch1_yaw2.jpg", "001/001000_pitch1_yaw1.jpg"]
PITTS_Q = ["000/000100_pitch1_yaw1.jpg", "000/000101_pitch1_yaw1.jpg"]
PITTS_UTM_DB = [(585000.0, 4477000.0), (585010.0, 4477000.0), (585300.0, 4477000.0)]
PITTS_UTM_Q = [(585008.0, 4477010.0), (585290.0, 4477000.0)]


def _pitts(root: Path, where: str = "datasets") -> Path:
    for i, n in enumerate(PITTS_DB):
        tiny_image(root / "images" / n, i)
    for n in PITTS_Q:
        tiny_image(root / "queries" / n)
    mat = root / where / "pitts30k_test.mat" if where else root / "pitts30k_test.mat"
    _write_dbstruct(mat, PITTS_DB, PITTS_UTM_DB, PITTS_Q, PITTS_UTM_Q)
    return mat


def test_dbstruct_fixture_has_the_original_layout(tmp_path):
    mat = _pitts(tmp_path / "pitts")
    # The positional access of pytorch-NetVlad / Patch-NetVLAD's parse_dbStruct must work on it.
    m = loadmat(mat)["dbStruct"].item()
    assert m[0].item() == "test"
    assert [f[0].item() for f in m[1]] == PITTS_DB
    np.testing.assert_allclose(m[2].T, PITTS_UTM_DB)
    assert [f[0].item() for f in m[3]] == PITTS_Q
    assert m[7].item() == 25.0
    st = read_dbstruct(mat)
    assert st.db_images == PITTS_DB and st.q_images == PITTS_Q and st.which_set == "test"
    np.testing.assert_allclose(st.q_utm, PITTS_UTM_Q)


def test_pittsburgh_mat(tmp_path):
    root = tmp_path / "pitts"
    _pitts(root)
    assert detect_layout(root).name == "netvlad-mat"
    ds = load_dataset(root)
    assert ds.layout == "netvlad-mat" and ds.database_dir == root / "images" and ds.queries_dir == root / "queries"
    assert ds.database_images == PITTS_DB and ds.query_images == PITTS_Q
    assert [p.tolist() for p in ds.ground_truth.positives] == [[0, 1], [2]]
    assert ds.ground_truth_rule == {"kind": "radius", "meters": 25.0, "source": "pitts30k_test.mat posDistThr"}
    narrow = load_dataset(root, positive_dist_threshold=11)
    assert [p.tolist() for p in narrow.ground_truth.positives] == [[1], [2]]
    assert narrow.ground_truth_rule["meters"] == 11.0
    # A second spec: the *_test one is the default, split= picks another.
    _write_dbstruct(
        root / "datasets" / "pitts30k_val.mat", PITTS_DB[:1], PITTS_UTM_DB[:1], PITTS_Q[:1], PITTS_UTM_Q[:1], "val"
    )
    assert len(load_dataset(root).query_images) == 2
    val = load_dataset(root, split="pitts30k_val")
    assert len(val.database_images) == 1 and "whichSet val" in val.description
    with pytest.raises(DatasetError, match="no dbStruct file named"):
        load_dataset(root, split="pitts250k_test")


def test_pittsburgh_missing_image_and_foreign_mat(tmp_path):
    root = tmp_path / "pitts"
    _pitts(root, where="")
    (root / "images" / PITTS_DB[2]).unlink()
    with pytest.raises(DatasetError, match="database image"):
        load_dataset(root)
    other = tmp_path / "other"
    other.mkdir()
    savemat(other / "x.mat", {"something": np.zeros(3)})
    with pytest.raises(DatasetError, match="unrecognised dataset layout"):
        detect_layout(other)


def test_tokyo247_mat(tmp_path):
    root = tmp_path / "tokyo247"
    db = ["03814/381433.jpg", "03814/381434.jpg"]
    q = ["247query_subset_v2/00001.jpg"]
    for n in db:
        tiny_image(root / "images" / n)
    tiny_image(root / "query" / q[0])
    _write_dbstruct(
        root / "tokyo247.mat",
        db,
        [(0, 0), (100, 0)],
        q,
        [(3, 4)],
        extra={"dbTimeStamp": np.array([[1.0, 2.0]]), "qTimeStamp": np.array([[3.0]])},
    )
    ds = load_dataset(root)
    assert ds.queries_dir == root / "query"
    assert ds.ground_truth.positives[0].tolist() == [0]
    assert "12 cutouts" in ds.description
    np.testing.assert_allclose(ds.database_metadata["timestamp"], [1.0, 2.0])


# --- MSLS --------------------------------------------------------------------------------------


def _msls_side(folder: Path, rows, labelled=True):
    """rows: (key, seq, frame, easting, northing, pano, night, view)."""
    for r in rows:
        tiny_image(folder / "images" / f"{r[0]}.jpg")
    lines = [",".join(("",) + SEQ_COLUMNS)] + [f"{i},{r[0]},{r[1]},{r[2]}" for i, r in enumerate(rows)]
    (folder / "seq_info.csv").write_text("\n".join(lines) + "\n")
    sub = [",all,s2w,w2s,o2n,n2o,d2n,n2d"] + [
        f"{i},True,{i % 2 == 0},False,False,False,False,False" for i, _ in enumerate(rows)
    ]
    (folder / "subtask_index.csv").write_text("\n".join(sub) + "\n")
    if not labelled:
        return
    raw = [",".join(("",) + RAW_COLUMNS)] + [
        f"{i},{r[0]},12.5,55.6,90.0,2016-06-0{1 + i % 8} 10:00:00,{r[5]}" for i, r in enumerate(rows)
    ]
    (folder / "raw.csv").write_text("\n".join(raw) + "\n")
    post = [",".join(("",) + POST_COLUMNS)] + [
        f"{i},{r[0]},{r[3]},{r[4]},{i},False,{r[6]},{r[7]}" for i, r in enumerate(rows)
    ]
    (folder / "postprocessed.csv").write_text("\n".join(post) + "\n")


def _msls(root: Path):
    cph = root / "train_val" / "cph"
    _msls_side(
        cph / "database",
        [
            ("cdb0", "s1", 0, 1000.0, 2000.0, False, False, "Forward"),
            ("cdb1", "s1", 1, 1010.0, 2000.0, True, False, "Forward"),  # panorama
            ("cdb2", "s1", 2, 1500.0, 2000.0, False, False, "Sideways"),
        ],
    )
    _msls_side(
        cph / "query",
        [
            ("cq0", "s2", 0, 1005.0, 2000.0, False, True, "Forward"),
            ("cq1", "s2", 1, 1495.0, 2000.0, False, False, "Backward"),
        ],
    )
    sf = root / "train_val" / "sf"
    # sf's UTM numbers overlap cph's on purpose: positives must stay within a city.
    _msls_side(sf / "database", [("sdb0", "t1", 0, 1000.0, 2001.0, False, False, "Forward")])
    _msls_side(sf / "query", [("sq0", "t2", 0, 3000.0, 2000.0, False, False, "Forward")])
    miami = root / "test" / "miami"
    _msls_side(miami / "database", [("mdb0", "u1", 0, 0, 0, False, False, "Forward")], labelled=False)
    _msls_side(miami / "query", [("mq0", "u2", 0, 0, 0, False, False, "Forward")], labelled=False)


def test_msls_val_cities(tmp_path):
    root = tmp_path / "msls"
    _msls(root)
    assert detect_layout(root).name == "msls"
    ds = load_dataset(root)  # default: the val cities cph, sf
    assert ds.database_images == [
        "train_val/cph/database/images/cdb0.jpg",
        "train_val/cph/database/images/cdb2.jpg",
        "train_val/sf/database/images/sdb0.jpg",
    ]
    assert ds.query_images[0] == "train_val/cph/query/images/cq0.jpg" and len(ds.query_images) == 3
    assert (root / ds.query_images[0]).is_file() and ds.queries_dir == root
    assert [p.tolist() for p in ds.ground_truth.positives] == [[0], [1], []]  # sq0 is far from sdb0; never cph's
    assert ds.ground_truth_rule == {"kind": "radius", "meters": 25.0, "scope": "per city"}
    assert ds.query_metadata["night"].tolist() == [True, False, False]
    assert ds.query_metadata["city"].tolist() == ["cph", "cph", "sf"]
    assert ds.database_metadata["view_direction"].tolist() == ["Forward", "Sideways", "Forward"]
    with_panos = load_dataset(root, cities="cph", include_panoramas=True)
    assert len(with_panos.database_images) == 3
    assert with_panos.ground_truth.positives[0].tolist() == [0, 1]
    s2w = load_dataset(root, cities="cph", subtask="s2w")  # rows flagged True: the even ones
    assert [Path(k).stem for k in s2w.query_images] == ["cq0"]
    sub = ds.subset(every=2, which="queries")
    assert sub.query_metadata["city"].tolist() == ["cph", "sf"]


def test_msls_test_city_is_unlabelled_and_mixing_is_refused(tmp_path):
    root = tmp_path / "msls"
    _msls(root)
    test = load_dataset(root, cities="test")
    assert test.ground_truth is None and test.ground_truth_rule == {"kind": "none"}
    with pytest.raises(DatasetError, match="miami"):
        load_dataset(root, cities="cph,miami")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(root, cities="london")
    with pytest.raises(ConfigError, match="subtask"):
        load_dataset(root, subtask="summer")


def test_msls_wrong_columns(tmp_path):
    root = tmp_path / "msls"
    _msls(root)
    p = root / "train_val" / "cph" / "query" / "postprocessed.csv"
    p.write_text(p.read_text().replace("easting", "east"))
    with pytest.raises(DatasetError, match="missing column.*easting"):
        load_dataset(root, cities="cph")


# --- VPR-datasets-downloader split layout (St Lucia …) ----------------------------------------


def test_vg_split_layout(tmp_path):
    root = tmp_path / "st_lucia"
    base = root / "images" / "test"
    tiny_image(base / "database" / "@500000.00@6960000.00@56@J@@@@@@@@@@db0.jpg")
    tiny_image(base / "database" / "@500100.00@6960000.00@56@J@@@@@@@@@@db1.jpg")
    tiny_image(base / "queries" / "@500010.00@6960000.00@56@J@@@@@@@@@@q0.jpg")
    assert detect_layout(root).name == "vg-split"
    ds = load_dataset(root)
    assert ds.database_dir == base / "database"
    assert ds.ground_truth.positives[0].tolist() == [0]
    assert ds.ground_truth_rule == {"kind": "radius", "meters": 25.0}
    assert load_dataset(root, positive_dist_threshold=5).ground_truth.positives[0].tolist() == []
    with pytest.raises(DatasetError, match="no split 'val'"):
        load_dataset(root, split="val")


# --- Baidu Mall --------------------------------------------------------------------------------


def _camera(path: Path, xyz, yaw_deg: float) -> None:
    c, s = np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))
    rot = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
    lines = ["1520.0 0 960.0", "0 1520.0 540.0", "0 0 1", "0 0"] + [" ".join(f"{v:.6f}" for v in r) for r in rot]
    lines += ["0 0 0", " ".join(f"{v:.3f}" for v in xyz), "1920 1080"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_baidu_mall(tmp_path):
    root = tmp_path / "baidu_mall"
    db = [((0, 0, 0), 0.0), ((5, 0, 0), 90.0), ((30, 0, 0), 0.0)]
    for i, (xyz, yaw) in enumerate(db):
        tiny_image(root / "training_images_undistort" / f"{i}.jpg")
        _camera(root / "training_gt" / f"{i}.camera", xyz, yaw)
    tiny_image(root / "query_images_undistort" / "q0.jpg")
    _camera(root / "query_gt" / "q0.camera", (2, 0, 0), 10.0)
    centre, euler = read_camera_file(root / "training_gt" / "1.camera")
    np.testing.assert_allclose(centre, [5, 0, 0])
    assert euler[0] == pytest.approx(90.0)
    assert detect_layout(root).name == "baidu-mall"
    ds = load_dataset(root)
    # db 0 (2 m, 10° yaw → mean Euler difference 3.3°) is positive; db 1 is near but faces away.
    assert ds.ground_truth.positives[0].tolist() == [0]
    assert ds.ground_truth_rule["meters"] == 10.0 and ds.ground_truth_rule["max_angle_diff_deg"] == 20.0
    assert load_dataset(root, max_angle_diff=None).ground_truth.positives[0].tolist() == [0, 1]
    assert load_dataset(root, positive_dist_threshold=40, max_angle_diff=None).ground_truth.positives[0].tolist() == [
        0,
        1,
        2,
    ]
    (root / "query_gt" / "q0.camera").write_text("not a camera\n")
    with pytest.raises(DatasetError, match="camera file"):
        load_dataset(root)


# --- AnyLoc unstructured sets and VP-Air ------------------------------------------------------


def test_hawkins_pose_rows(tmp_path):
    root = tmp_path / "hawkins"
    for i in range(76):
        tiny_image(root / "db_images" / f"{i}.png")
    for i in range(75):
        tiny_image(root / "q_images" / f"{i}.png")
    poses = np.zeros((151, 3))
    poses[:76, 0] = np.arange(76) * 10.0  # database every 10 m along x
    poses[76:, 0] = np.arange(75) * 10.0 + 3.0
    np.save(root / "pose_topic_list.npy", poses)
    assert detect_layout(root).name == "anyloc-unstructured"
    ds = load_dataset(root)
    assert ds.database_images[:3] == ["0.png", "1.png", "2.png"]  # natural order, aligned with the rows
    assert ds.ground_truth.positives[10].tolist() == [10, 11]  # 3 m and 7 m away; 12 is 17 m
    assert ds.ground_truth_rule["meters"] == 8.0
    assert ds.ground_truth_rule["pose_rows"] == {"database": [0, 76], "queries": [76, 151]}


def test_unstructured_rows_options_list_and_pickle(tmp_path):
    root = tmp_path / "laurel_like"
    for i in range(3):
        tiny_image(root / "db_images" / f"img{i}.png")
    for i in range(2):
        tiny_image(root / "q_images" / f"img{i}.png")
    poses = np.array([[0, 0], [20, 0], [40, 0], [99, 99], [1, 0], [39, 0]], dtype=float)
    np.save(root / "pose_topic_list.npy", poses)
    with pytest.raises(DatasetError, match="do not match"):
        load_dataset(root, query_rows="3:6")
    ds = load_dataset(root, db_rows="0:3", query_rows="4:6")
    assert [p.tolist() for p in ds.ground_truth.positives] == [[0], [2]]
    (root / "ground_truth.csv").write_text("query,positives\nq_images/img0.png,db_images/img1.png\n")
    assert load_dataset(root).ground_truth.positives[0].tolist() == [1]
    mar = tmp_path / "mid_atlantic_ridge"
    tiny_image(mar / "db_images" / "0.png")
    tiny_image(mar / "q_images" / "0.png")
    np.save(mar / "eiffel_gt.npy", np.array([[0, [0]]], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match="pickle"):
        load_dataset(mar)


def test_vp_air(tmp_path):
    root = tmp_path / "vpair"
    for i in range(1, 4):
        tiny_image(root / "queries" / f"{i:05d}.png")
        tiny_image(root / "reference_views" / f"{i:05d}.png")
    tiny_image(root / "distractors" / "00001.png")
    assert detect_layout(root).name == "vp-air"
    ds = load_dataset(root)
    assert ds.database_images == ["reference_views/00001.png", "reference_views/00002.png", "reference_views/00003.png"]
    assert [p.tolist() for p in ds.ground_truth.positives] == [[0], [1], [2]]
    wide = load_dataset(root, tolerance=1, include_distractors=True)
    assert wide.database_images[-1] == "distractors/00001.png"
    assert wide.ground_truth.positives[1].tolist() == [0, 1, 2]
    assert wide.ground_truth_rule["tolerance"] == 1


# --- AmsterTime --------------------------------------------------------------------------------


def test_amstertime(tmp_path):
    root = tmp_path / "amstertime"
    for i in range(3):
        tiny_image(root / "old" / f"{i:04d}.jpg")
        tiny_image(root / "new" / f"{i:04d}.png")
    tiny_image(root / "new" / "extra.png")
    assert detect_layout(root).name == "amstertime"
    ds = load_dataset(root)
    assert ds.queries_dir == root / "old"
    assert [p.tolist() for p in ds.ground_truth.positives] == [[0], [1], [2]]
    assert ds.ground_truth_rule["kind"] == "pairs"
    swapped = load_dataset(root, queries="new")
    assert swapped.ground_truth.positives[3].tolist() == []


# --- RobotCar-style CSV ------------------------------------------------------------------------

INS_HEADER = (
    "timestamp,ins_status,latitude,longitude,altitude,northing,easting,down,utm_zone,"
    "velocity_north,velocity_east,velocity_down,roll,pitch,yaw"
)


def _traversal(folder: Path, t0: int, offsets_m) -> None:
    rows = [INS_HEADER]
    for k in range(6):  # one pose row per second, driving east at 10 m/s
        t = t0 + k * 1_000_000
        rows.append(f"{t},INS_SOLUTION_GOOD,51.76,-1.26,100,5735000.0,{620000.0 + 10 * k},-100,30U,0,10,0,0,0,1.57")
    (folder / "gps").mkdir(parents=True, exist_ok=True)
    (folder / "gps" / "ins.csv").write_text("\n".join(rows) + "\n")
    for off in offsets_m:
        tiny_image(folder / "stereo" / "centre" / f"{t0 + int(off / 10 * 1_000_000)}.png")


def test_robotcar_csv(tmp_path):
    root = tmp_path / "robotcar"
    _traversal(root / "2014-12-09-13-21-02", 1418133243000000, [0, 20, 45])
    _traversal(root / "2014-12-16-18-44-24", 1418755464000000, [5, 44])
    assert detect_layout(root).name == "robotcar-csv"
    ds = load_dataset(root, positive_dist_threshold=10)
    assert ds.database_dir.name == "2014-12-09-13-21-02"
    np.testing.assert_allclose(ds.query_poses[:, 0], [620005.0, 620044.0])
    assert [p.tolist() for p in ds.ground_truth.positives] == [[0], [2]]
    assert ds.ground_truth_rule == {"kind": "radius", "meters": 10.0}
    assert ds.query_metadata["timestamp"][0] == 1418755464500000
    swapped = load_dataset(root, queries="2014-12-09-13-21-02")
    assert swapped.queries_dir.name == "2014-12-09-13-21-02"


# --- VPR-Bench index-aligned sets, Nordland partitions, Gardens Point ------------------------


def test_vpr_bench_pickle_with_tolerance_and_17places_default(tmp_path):
    for name in ("SPED", "17places"):
        root = tmp_path / name
        for i in range(40):
            tiny_image(root / "ref" / f"{i:07d}.jpg")
            tiny_image(root / "query" / f"{i:07d}.jpg")
        (root / "ground_truth_new.npy").write_bytes(b"\x93NUMPY pickled")
    with pytest.raises(DatasetError, match="tolerance=N"):
        load_dataset(tmp_path / "SPED")
    sped = load_dataset(tmp_path / "SPED", tolerance=0)
    assert sped.ground_truth.positives[5].tolist() == [5]
    assert sped.ground_truth_rule == {"kind": "frames", "tolerance": 0, "match": "index"}
    places = load_dataset(tmp_path / "17places")
    assert places.ground_truth.positives[20].tolist() == list(range(5, 36))
    assert places.ground_truth_rule["tolerance"] == 15 and "17 Places" in places.ground_truth_rule["protocol"]


def test_nordland_partition_folders_and_frame_list(tmp_path):
    root = tmp_path / "nordland"
    for season in ("nordland_spring_images", "nordland_summer_images", "nordland_winter_images"):
        for section in ("section1", "section2"):
            for i in range(3):
                tiny_image(root / season / section / f"images-{(1 if section == 'section1' else 5) * 1000 + i:05d}.png")
    ds = load_dataset(root)
    assert ds.queries_dir.name == "nordland_winter_images" and ds.database_dir.name == "nordland_summer_images"
    assert ds.query_images[0] == "section1/images-01000.png"
    assert ds.ground_truth_rule["kind"] == "frames" and "Patch-NetVLAD" in ds.ground_truth_rule["protocol"]
    listing = tmp_path / "nordland_imageNames_index.txt"
    listing.write_text("./nordland/summer/images-05000.png\n./nordland/summer/images-05001.png\n")
    test = load_dataset(root, frame_list=listing, tolerance=0)
    assert test.query_images == ["section2/images-05000.png", "section2/images-05001.png"]
    assert [p.tolist() for p in test.ground_truth.positives] == [[0], [1]]
    spring = load_dataset(root, queries="nordland_spring_images")
    assert spring.database_dir.name == "nordland_summer_images"


def test_gardens_point_protocol(tmp_path):
    root = tmp_path / "gardens"
    for side in ("day_left", "day_right", "night_right"):
        for i in range(4):
            tiny_image(root / side / f"Image{i:03d}.jpg")
    ds = load_dataset(root)
    assert ds.queries_dir.name == "night_right" and ds.database_dir.name == "day_right"
    assert ds.ground_truth.positives[0].tolist() == [0, 1]


# --- the shared data still detects as before; rules are recorded; describe lists everything ---


def test_shared_datasets_keep_their_layouts_and_record_rules(monkeypatch):
    monkeypatch.setenv("VPRKIT_DATA", str(SHARED))
    corridor = load_dataset("corridor")
    assert corridor.layout == "vpr-bench" and corridor.ground_truth_rule == {"kind": "list", "file": "ground_truth.csv"}
    nordland = load_dataset("nordland-64x32:600")
    assert nordland.layout == "sequences"
    assert nordland.ground_truth_rule["tolerance"] == 0 and nordland.ground_truth_rule["match"] == "name"
    assert load_dataset("nordland-64x32").ground_truth_rule["tolerance"] == 1
    toy = load_dataset("toy-unlabelled")
    assert toy.layout == "utm-filenames" and toy.ground_truth_rule == {"kind": "none"}
    assert "ground-truth rule: list ground_truth.csv" in corridor.describe()


def test_describe_adapters_names_every_format():
    text = describe_adapters()
    for name in (
        "netvlad-mat",
        "msls",
        "baidu-mall",
        "anyloc-unstructured",
        "vp-air",
        "vpr-bench",
        "amstertime",
        "explicit",
        "vg-split",
        "utm-filenames",
        "robotcar-csv",
        "sequences",
        "anyloc-aerial",
    ):
        assert name in DATASET_ADAPTERS.names() and f"  {name}:" in text
    assert "ground truth:" in text


def test_positive_dist_threshold_and_radius_alias(tmp_path):
    root = tmp_path / "street"
    tiny_image(root / "database" / "@0.00@0.00@33@T@@@@@@@@@@@d.jpg")
    tiny_image(root / "queries" / "@12.00@0.00@33@T@@@@@@@@@@@q.jpg")
    assert load_dataset(root, positive_dist_threshold=10).ground_truth.positives[0].tolist() == []
    assert load_dataset(root, radius=15).ground_truth.positives[0].tolist() == [0]
    with pytest.raises(ConfigError, match="disagree"):
        load_dataset(root, radius=15, positive_dist_threshold=10)
    with pytest.raises(ConfigError, match="> 0"):
        load_dataset(root, positive_dist_threshold=0)


def test_nordland_partition_selected_by_parent_name(tmp_path):
    # Olid et al.'s partitioned download: nordland/test/<season>_images_test/section*/…
    root = tmp_path / "nordland" / "test"
    for season in ("fall", "spring", "summer", "winter"):
        for i in range(3):
            tiny_image(root / f"{season}_images_test" / "section1" / f"{i}.png")
    ds = load_dataset(root)
    assert ds.queries_dir.name == "winter_images_test" and ds.database_dir.name == "summer_images_test"
    assert ds.ground_truth.positives[1].tolist() == [0, 1, 2]


def test_format_rule_and_describe():
    from vprkit.datasets import format_rule

    assert format_rule({"kind": "radius", "meters": 25.0}) == "radius 25 m"
    assert format_rule({"kind": "frames", "tolerance": 15, "match": "index", "protocol": "x"}).startswith(
        "frame number ±15"
    )
    assert "heading ≤ 20°" in format_rule({"kind": "radius", "meters": 10.0, "max_heading_diff_deg": 20.0})


def test_anyloc_oxford_cell_dbstruct(tmp_path):
    # AnyLoc's oxdatapart.mat: dbStruct is a 1×8 cell, names a space-padded char matrix, locations N×2.
    root = tmp_path / "Oxford_Robotcar"
    db, q = ["db/0001.jpg", "db/0002.jpg"], ["q/0001.jpg"]
    for n in db + q:
        tiny_image(root / "oxDataPart" / n)
    cell = np.empty((1, 8), dtype=object)
    cell[0, 0] = np.array([n.ljust(14) for n in db])
    cell[0, 1] = np.array([[0.0, 0.0], [50.0, 0.0]])
    cell[0, 2] = np.array([n.ljust(14) for n in q])
    cell[0, 3] = np.array([[48.0, 0.0]])
    cell[0, 4], cell[0, 5], cell[0, 6], cell[0, 7] = 2.0, 1.0, 25.0, 625.0
    savemat(root / "oxdatapart.mat", {"dbStruct": cell})
    m = loadmat(root / "oxdatapart.mat")["dbStruct"][0]  # AnyLoc's positional access
    assert m[0][1].replace(" ", "") == db[1] and m[6].item() == 25.0
    ds = load_dataset(root)
    assert ds.layout == "netvlad-mat" and ds.database_dir == root / "oxDataPart"
    assert ds.database_images == db and ds.query_images == q
    assert ds.ground_truth.positives[0].tolist() == [1]


def test_anyloc_aerial(tmp_path):
    root = tmp_path / "test_40_midref_rot0"
    for i in range(12):
        tiny_image(root / "reference_images" / f"{i}.png")
    for i in range(2):
        tiny_image(root / "query_images" / f"{i}.png")
    (root / "gt_matches.csv").write_text(
        "query_ind,top_1_ref_ind,top_2_ref_ind,top_3_ref_ind,top_4_ref_ind,top_5_ref_ind\n0,10,11,9,8,7\n1,2,3,1,0,4\n"
    )
    assert detect_layout(root).name == "anyloc-aerial"
    ds = load_dataset(root)
    assert ds.database_images[10] == "10.png"  # natural order: the indices refer to it
    assert ds.ground_truth.positives[0].tolist() == [7, 8, 9, 10, 11]
    assert ds.ground_truth_rule["kind"] == "list"
    (root / "gt_matches.csv").write_text(
        "query_ind,top_1_ref_ind,top_2_ref_ind,top_3_ref_ind,top_4_ref_ind,top_5_ref_ind\n0,1,2,3,4,99\n"
    )
    with pytest.raises(DatasetError, match="out of range"):
        load_dataset(root)


def test_nordland_tolerance_follows_the_frame_step(tmp_path):
    # Full frame rate (images-00202, -00203 …): ±10 original frames = ±10 files.
    root = tmp_path / "nordland"
    for season in ("summer", "winter"):
        for i in range(30):
            tiny_image(root / season / f"images-{202 + i:05d}.png")
    ds = load_dataset(root)
    assert ds.ground_truth_rule["tolerance"] == 10
    assert ds.ground_truth.positives[15].tolist() == list(range(5, 26))
    assert load_dataset(root, tolerance=2).ground_truth_rule["tolerance"] == 2


def test_openibl_style_mat_beside_image_root(tmp_path):
    root = tmp_path / "raw"
    for i, n in enumerate(PITTS_DB):
        tiny_image(root / "Pittsburgh" / "images" / n, i)
    for n in PITTS_Q:
        tiny_image(root / "Pittsburgh" / "queries" / n)
    _write_dbstruct(root / "pitts250k_test.mat", PITTS_DB, PITTS_UTM_DB, PITTS_Q, PITTS_UTM_Q)
    ds = load_dataset(root)
    assert ds.database_dir == root / "Pittsburgh" / "images" and ds.queries_dir == root / "Pittsburgh" / "queries"
    assert [p.tolist() for p in ds.ground_truth.positives] == [[0, 1], [2]]
