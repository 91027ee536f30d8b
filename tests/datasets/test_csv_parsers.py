"""Strict CSV grammars of ground-truth lists and pose files, and matching poses to image keys.

Each case names the file and line in one DatasetError; the property-based tests check that any
well-formed generated file round-trips and that any malformed one raises DatasetError only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vprkit.datasets import GroundTruth, load_dataset, read_poses
from vprkit.datasets.ground_truth import read_ground_truth_csv
from vprkit.datasets.poses import Poses, latlon_to_utm, match_poses
from vprkit.errors import DatasetError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"
QUERIES = ["a.jpg", "b.jpg", "c.jpg"]
DATABASE = ["r0.jpg", "r1.jpg", "r2.jpg", "r3.jpg"]
# Hypothesis: few examples, so the whole module runs in a few seconds.
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def _gt(path: Path, q=QUERIES, db=DATABASE, **kw) -> list[list[int]]:
    return [p.tolist() for p in GroundTruth.from_list(path, q, db, **kw).positives]


# --- ground truth -----------------------------------------------------------------------------


def test_comma_separated_positives_are_all_kept(tmp_path):
    # Used to keep only r0.jpg (csv split the positives into fields, only field 2 was read).
    f = _write(tmp_path / "gt.csv", "query,positives\nquery/a.jpg,ref/r0.jpg,ref/r1.jpg,ref/r2.jpg\n")
    assert _gt(f, query_prefix="query", db_prefix="ref") == [[0, 1, 2], [], []]


@pytest.mark.parametrize(
    "text",
    [
        "query,positives\na.jpg,r0.jpg r2.jpg\nb.jpg,r1.jpg\n",  # Corridor's own format
        "query,positives\na.jpg,r0.jpg,r2.jpg\nb.jpg,r1.jpg\n",  # spreadsheet export
        'query,positives\na.jpg,"r0.jpg;r2.jpg"\nb.jpg,r1.jpg\n',  # quoted, ';' inside
        "query;positives\na.jpg;r0.jpg;r2.jpg\nb.jpg;r1.jpg\n",  # European Excel
        "query\tpositives\na.jpg\tr0.jpg, r2.jpg\nb.jpg\tr1.jpg\n",  # tab-separated
        "\ufeffQuery,Positives,,\r\n\r\na.jpg,r0.jpg  r2.jpg ,\r\nb.jpg,r1.jpg\r\nc.jpg\r\n",  # BOM, CRLF, blanks
        "query,positives\n./a.jpg,.\\r0.jpg r2.jpg\nb.jpg,r1.jpg\nc.jpg,\n",  # ./ and backslashes
    ],
)
def test_positive_separators(tmp_path, text):
    assert _gt(_write(tmp_path / "gt.csv", text)) == [[0, 2], [1], []]


def test_corridor_with_comma_separated_positives_equals_the_original(tmp_path):
    original = SHARED / "corridor" / "ground_truth.csv"
    root = tmp_path / "corridor"
    root.mkdir()
    (root / "ref").symlink_to((SHARED / "corridor" / "ref").resolve())
    (root / "query").symlink_to((SHARED / "corridor" / "query").resolve())
    lines = original.read_text().splitlines()
    (root / "ground_truth.csv").write_text("\n".join([lines[0]] + [ln.replace(" ", ",") for ln in lines[1:]]) + "\n")
    converted = load_dataset(root).ground_truth
    reference = load_dataset(SHARED / "corridor").ground_truth
    assert converted.n_positives.sum() == reference.n_positives.sum() > 2 * converted.n_queries
    np.testing.assert_array_equal(converted.to_matrix(), reference.to_matrix())


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "query,positives\na.jpg;r0.jpg\n",
            r"line 2: the query field 'a.jpg;r0.jpg' contains ';' but the header separates columns with ','",
        ),
        (
            "query,positives\na.jpg r0.jpg r1.jpg\n",
            r"line 2: the query field 'a.jpg r0.jpg r1.jpg' contains whitespace",
        ),
        ("query;positives\na.jpg,r0.jpg\n", r"line 2: .*contains ',' but the header separates columns with ';'"),
        ("query,positives;\na.jpg,r0.jpg\n", r"line 1: the header mixes separators"),
        ("query positives\na.jpg r0.jpg\n", r"line 1: the header 'query positives' has a single column"),
        ("positives,query\nr0.jpg,a.jpg\n", r"exactly the columns query,positives in that order"),
        ("query,positives,notes\na.jpg,r0.jpg,x\n", r"exactly the columns query,positives"),
        ("query,refs\na.jpg,r0.jpg\n", r"missing column\(s\) positives"),
        ("query,positives\n,r0.jpg\n", r"line 2: empty query name"),
        ('query,positives\na.jpg,"r0.jpg\n', r"line 2: malformed CSV"),
        ("query,positives\n\na.jpg,r0.jpg\n\na.jpg,r1.jpg\n", r"line 5: query 'a.jpg' already listed on line 3"),
        ("query,positives\na.jpg,r0.jpg,r9.jpg\n", r"unknown database image\(s\) 'r9.jpg \(line 2\)'"),
        ("\n\n", r"is empty"),
    ],
)
def test_ground_truth_errors(tmp_path, text, message):
    with pytest.raises(DatasetError, match=message) as info:
        GroundTruth.from_list(_write(tmp_path / "gt.csv", text), QUERIES, DATABASE)
    assert "gt.csv" in str(info.value) and "\n" not in str(info.value)


def test_ground_truth_encoding_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"line 2: not valid UTF-8"):
        GroundTruth.from_list(
            _write(tmp_path / "l1.csv", "query,positives\na.jpg,r\xe9.jpg\n", "latin-1"), QUERIES, DATABASE
        )
    (tmp_path / "nul.csv").write_bytes(b"query,positives\na.jpg,r0\x00.jpg\n")
    with pytest.raises(DatasetError, match=r"line 2: contains a NUL byte"):
        GroundTruth.from_list(tmp_path / "nul.csv", QUERIES, DATABASE)


# --- poses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "image;easting;northing;heading\na.jpg;10;20;90\nb.jpg;13.5;2.4e1;\n",
        "image\teasting\tnorthing\theading\na.jpg\t10\t20\t90\nb.jpg\t13.5\t24\n",  # optional field left out
        "\ufeffIMAGE,X,Y,Heading,altitude\r\n./a.jpg,+10,20.0,90,5\r\n\r\nb.jpg,13.5,24,,7\r\n",
    ],
)
def test_pose_separators_and_spellings(tmp_path, text):
    p = read_poses(_write(tmp_path / "p.csv", text))
    assert p.keys == ["a.jpg", "b.jpg"]
    np.testing.assert_allclose(p.xy, [[10, 20], [13.5, 24]])
    assert p.headings[0] == 90 and np.isnan(p.headings[1])


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "image,easting,northing\na.jpg,1,2\n\n\nb.jpg,1,abc\n",
            r"line 5: column 'northing' has 'abc', which is not a number",
        ),
        ("image,easting,northing\na.jpg,1,nan\n", r"line 2: column 'northing' has 'nan', not finite"),
        ("image,easting,northing\na.jpg,inf,2\n", r"line 2: column 'easting' has 'inf', not finite"),
        ("image,easting,northing\na.jpg,1,1e999\n", r"line 2: column 'northing' is '1e999', which overflows"),
        ("image,easting,northing,heading\na.jpg,1,2,nan\n", r"line 2: column 'heading' has 'nan', not finite"),
        ("image,easting,northing\na.jpg,1,\n", r"line 2: column 'northing' has '', empty"),
        ("image,easting,northing\na.jpg,1_000,2\n", r"line 2: column 'easting' has '1_000'"),
        ("image;easting;northing\na.jpg;12,5;3\n", r"line 2: column 'easting' has '12,5', a decimal comma"),
        ("image,easting,northing\na.jpg,1,2,3\n", r"line 2: 4 field\(s\), expected 3"),
        (
            "image,easting,northing\na.jpg;1;2\n",
            r"line 2: 1 field\(s\), expected 3 .*contains ';' but the header separates columns with ','",
        ),
        ("image,easting,northing\na.jpg,1;2,3\n", r"line 2: column 'easting' has '1;2'.*mixed separators"),
        ("image,easting;northing\na.jpg,1,2\n", r"line 1: the header mixes separators"),
        ("image easting northing\na.jpg 1 2\n", r"line 1: .*single column"),
        ("image,x,easting,northing\na.jpg,1,1,2\n", r"columns 'x', 'easting' all mean 'easting'"),
        ("image,,easting,northing\na.jpg,,1,2\n", r"line 1: header column 2 has no name"),
        ("image,easting,northing\n", r"no pose rows"),
        ("a.jpg,1,2\nb.jpg,3,4\n", r"missing column\(s\) image, easting, northing"),
        ("image,easting,northing\n,1,2\n", r"line 2: empty image name"),
        ("image,easting,northing\n./a.jpg,1,2\na.jpg,1,2\n", r"line 3: image 'a.jpg' already appears on line 2"),
        ("image,lat,lon\na.jpg,48.85,2.29\nb.jpg,2.29,148.85\n", r"line 3: lon 148.85 is .* from the central meridian"),
        ("image,lat,lon\na.jpg,48.85,2.29\nb.jpg,95,2.29\n", r"line 3: lat 95, lon 2.29 is not a position on Earth"),
        ("image,lat,lon\na.jpg,48.85,2.29\nb.jpg,48.85,200\n", r"line 3: .*not a position on Earth"),
        ("image,lat,lon\na.jpg,-85,2.29\n", r"line 2: lat -85 is outside UTM's range"),
        ('image,easting,northing\n"a.jpg,1,2\n', r"malformed CSV"),
    ],
)
def test_pose_errors(tmp_path, text, message):
    with pytest.raises(DatasetError, match=message) as info:
        read_poses(_write(tmp_path / "p.csv", text))
    assert "p.csv" in str(info.value) and "\n" not in str(info.value)


def test_unknown_pose_columns_are_ignored_and_logged(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vprkit.datasets.poses"):
        p = read_poses(_write(tmp_path / "p.csv", "image,easting,northing,altitude\na.jpg,1,2,300\n"))
    assert p.keys == ["a.jpg"] and "ignoring column(s) altitude" in caplog.text


# --- matching poses to images ------------------------------------------------------------------


def _poses(names, source="poses.csv") -> Poses:
    return Poses(list(names), np.arange(2 * len(names), dtype=float).reshape(-1, 2), source=source)


def test_pose_rows_with_a_folder_prefix_match_nothing_and_say_why():
    keys = [f"img{i:03d}.jpg" for i in range(20)]
    poses = _poses([f"db/{k}" for k in keys])
    with pytest.raises(
        DatasetError, match=r"0 of 20 image\(s\) have a pose.*20 of 20 pose row\(s\) match no image.*prefix 'db/'"
    ) as info:
        match_poses(poses, keys)
    assert "'db/img000.jpg'" in str(info.value) and "prefix='db'" in str(info.value)
    matched, report = match_poses(poses, keys, allow_no_match=True)
    assert len(matched) == 0 and report.n_unmatched_poses == 20 and report.n_images_without_pose == 20
    assert len(report.unmatched_poses) == 5 and report.to_dict()["hint"]
    matched, report = match_poses(poses, keys, prefix="db")
    assert report.complete and matched.keys == keys
    np.testing.assert_array_equal(matched.lookup(keys), poses.xy)


def test_partial_pose_match_is_a_logged_report(caplog):
    keys = ["a.jpg", "b.jpg", "c.jpg"]
    poses = _poses(["c.jpg", "a.jpg", "zz.jpg"])
    with caplog.at_level(logging.WARNING, logger="vprkit.datasets.poses"):
        matched, report = match_poses(poses, keys)
    assert matched.keys == ["a.jpg", "c.jpg"]  # image-key order
    np.testing.assert_array_equal(matched.xy, [[2, 3], [0, 1]])
    assert (report.n_matched, report.n_unmatched_poses, report.n_images_without_pose) == (2, 1, 1)
    assert report.unmatched_poses == ["zz.jpg"] and report.images_without_pose == ["b.jpg"]
    assert "2 of 3 image(s) have a pose; 1 without a pose ('b.jpg')" in caplog.text
    assert "1 of 3 pose row(s) match no image ('zz.jpg')" in caplog.text
    looked = matched.lookup(keys)
    assert np.isnan(looked[1]).all()


def test_pose_match_hints_and_duplicates():
    _, report = match_poses(_poses(["img1.jpg"]), ["seq/img1.jpg", "x.jpg"], allow_no_match=True, log_warnings=False)
    assert "Image keys have sub-folders" in report.hint
    _, report = match_poses(_poses(["IMG1.JPG"]), ["img1.jpg"], allow_no_match=True, log_warnings=False)
    assert "differ only in case" in report.hint
    with pytest.raises(DatasetError, match=r"image 'a.jpg' has two pose rows"):
        match_poses(_poses(["a.jpg", "db/a.jpg"]), ["a.jpg"], prefix="db")


def test_explicit_layout_reports_pose_rows_matching_no_image(tmp_path, caplog):
    from PIL import Image

    root = tmp_path / "explicit"
    for sub, name in (("database", "d0.png"), ("database", "d1.png"), ("queries", "q0.png")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6)).save(root / sub / name)
    (root / "poses.csv").write_text(
        "image,easting,northing\ndatabase/d0.png,0,0\ndatabase/d1.png,100,0\nqueries/q0.png,1,0\ndatabase/old.png,5,5\n"
    )
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(root)
    assert ds.ground_truth.positives[0].tolist() == [0]
    assert "1 pose row(s) match no image" in ds.description and "'database/old.png'" in caplog.text
    (root / "poses.csv").write_text("image,easting,northing\nd0.png,0,0\nd1.png,1,0\nq0.png,1,0\n")
    with pytest.raises(DatasetError, match=r"0 of 3 image\(s\) have a pose.*Image keys have sub-folders"):
        load_dataset(root)


# --- property-based: round trips and malformed files -------------------------------------------

NAME = st.from_regex(r"[a-z0-9_]{1,8}(/[a-z0-9_-]{1,6})?\.(jpg|png)", fullmatch=True)
SEPARATORS = st.sampled_from([",", ";", "\t"])
NUMBER = st.floats(min_value=-1e7, max_value=1e7, allow_nan=False, allow_infinity=False)


@st.composite
def pose_files(draw):
    names = draw(st.lists(NAME, min_size=1, max_size=8, unique=True))
    sep = draw(SEPARATORS)
    geographic = draw(st.booleans())
    with_heading = draw(st.booleans())
    if geographic:
        lat = st.floats(min_value=-79.9, max_value=83.9)
        lon0 = draw(st.floats(min_value=-170, max_value=170))
        lon = st.floats(min_value=lon0 - 2, max_value=lon0 + 2)
        values = [(draw(lat), draw(lon)) for _ in names]
    else:
        values = [(draw(NUMBER), draw(NUMBER)) for _ in names]
    headings = [draw(st.one_of(st.none(), NUMBER)) for _ in names]
    header = ["image", *(("lat", "lon") if geographic else ("easting", "northing"))] + (
        ["heading"] if with_heading else []
    )
    lines = [sep.join(header)]
    for name, (a, b), h in zip(names, values, headings):
        fields = [name, repr(a), repr(b)] + ([("" if h is None else repr(h))] if with_heading else [])
        lines.append(sep.join(fields))
        if draw(st.booleans()):
            lines.append("")
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(lines) + newline, names, values, headings if with_heading else None, geographic


@FAST
@given(pose_files())
def test_pose_files_round_trip(tmp_path, generated):
    text, names, values, headings, geographic = generated
    p = read_poses(_write(tmp_path / "p.csv", text))
    assert p.keys == names
    ab = np.array(values, dtype=float)
    expected = latlon_to_utm(ab[:, 0], ab[:, 1])[0] if geographic else ab
    np.testing.assert_array_equal(p.xy, expected)
    if headings is None:
        assert p.headings is None
    else:
        np.testing.assert_array_equal(p.headings, [np.nan if h is None else h for h in headings])


POSE_MUTATIONS = [
    lambda lines, sep: lines[:1] + [lines[1].replace(lines[1].split(sep)[1], "abc", 1)] + lines[2:],
    lambda lines, sep: lines[:1] + [lines[1].replace(lines[1].split(sep)[2], "nan", 1)] + lines[2:],
    lambda lines, sep: lines[:1] + [lines[1] + sep + "1" + sep + "2"] + lines[2:],  # extra fields
    lambda lines, sep: lines[:1] + [sep.join(lines[1].split(sep)[:2])] + lines[2:],  # missing position
    lambda lines, sep: lines[:1] + [lines[1].replace(sep, ";" if sep != ";" else ",")] + lines[2:],  # mixed
    lambda lines, sep: lines[:1] + [lines[1], lines[1]] + lines[2:],  # duplicate image
    lambda lines, sep: lines[1:],  # header dropped
    lambda lines, sep: [lines[0].replace(sep, " ")] + lines[1:],  # whitespace header
    lambda lines, sep: lines[:1],  # no rows
    lambda lines, sep: lines[:1] + ['"' + lines[1]] + lines[2:],  # stray quote
]


@FAST
@given(pose_files(), st.sampled_from(range(len(POSE_MUTATIONS))))
def test_malformed_pose_files_raise_dataset_error(tmp_path, generated, which):
    text, *_ = generated
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln]
    sep = next(s for s in (",", ";", "\t") if s in lines[0])
    mutated = "\n".join(POSE_MUTATIONS[which](lines, sep)) + "\n"
    with pytest.raises(DatasetError):
        read_poses(_write(tmp_path / "p.csv", mutated))


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_parsers(tmp_path, data):
    path = tmp_path / "any.csv"
    path.write_bytes(b"image,easting,northing\n" + data if data[:1] == b"a" else data)
    for parse in (read_poses, read_ground_truth_csv):
        try:
            parse(path)
        except DatasetError:
            pass


@st.composite
def ground_truth_files(draw):
    queries = draw(st.lists(NAME, min_size=1, max_size=6, unique=True))
    database = draw(st.lists(NAME, min_size=1, max_size=8, unique=True))
    sep = draw(SEPARATORS)
    listed = draw(st.lists(st.sampled_from(range(len(queries))), unique=True, max_size=len(queries)))
    lines = [f"query{sep}positives"]
    expected = [[] for _ in queries]
    for qi in listed:
        pos = draw(st.lists(st.sampled_from(range(len(database))), max_size=4))
        expected[qi] = sorted(set(pos))
        names = [database[i] for i in pos]
        style = draw(st.sampled_from(["space", "fields", "semicolon", "comma-quoted"]))
        if style == "space":
            row = [queries[qi], " ".join(names)]
        elif style == "fields":
            row = [queries[qi], *names]
        elif style == "semicolon" and sep != ";":
            row = [queries[qi], ";".join(names)]
        else:
            row = [queries[qi], '"' + ",".join(names) + '"'] if names else [queries[qi]]
        lines.append(sep.join(row))
    return "\n".join(lines) + "\n", queries, database, expected


@FAST
@given(ground_truth_files())
def test_ground_truth_round_trip(tmp_path, generated):
    text, queries, database, expected = generated
    gt = GroundTruth.from_list(_write(tmp_path / "gt.csv", text), queries, database)
    assert [p.tolist() for p in gt.positives] == expected


@FAST
@given(ground_truth_files(), st.sampled_from(["unknown", "mixed", "duplicate", "header", "quote"]))
def test_malformed_ground_truth_raises_dataset_error(tmp_path, generated, how):
    text, queries, database, _ = generated
    lines = text.splitlines()
    sep = next(s for s in (",", ";", "\t") if s in lines[0])
    if how == "unknown":
        lines.append(f"{queries[0]}{sep}missing_image.jpg")
        lines = (
            [ln for ln in lines if not ln.startswith(queries[0] + sep)][:1]
            + lines[-1:]
            + [ln for ln in lines[1:-1] if not ln.startswith(queries[0] + sep)]
        )
    elif how == "mixed":
        other = ";" if sep != ";" else ","
        lines.append(f"{queries[0]}{other}{database[0]}")
    elif how == "duplicate":
        lines += [f"{queries[0]}{sep}", f"{queries[0]}{sep}"]
    elif how == "header":
        lines[0] = f"positives{sep}query"
    else:
        lines.append(f'{queries[0]}{sep}"{database[0]}')
    with pytest.raises(DatasetError):
        GroundTruth.from_list(_write(tmp_path / "gt.csv", "\n".join(lines) + "\n"), queries, database)


@pytest.mark.parametrize("data", [b";", b",", b"\x0c,", b",,\n,\n"])
def test_fuzz_findings_header_of_separators_only(tmp_path, data):
    # Found by scripts/fuzz_inputs.py: an AssertionError instead of a DatasetError.
    (tmp_path / "f.csv").write_bytes(data)
    for parse in (read_poses, read_ground_truth_csv):
        with pytest.raises(DatasetError):
            parse(tmp_path / "f.csv")
