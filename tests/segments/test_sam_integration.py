"""SAM automatic mask generator, end to end through the SegVLAD pieces, with a randomly initialised SAM.

Runs only where segment-anything and torchvision import (the SAM venv); the main suite deselects it
with ``-m "not sam"`` (see conftest.py). CI::

    /work/venv-sam/bin/python -m pytest -q -m sam tests/segments/test_sam_integration.py

Why the thresholds are lowered: a randomly initialised SAM predicts IoUs of about 0.03–0.08 and
stability scores of 0 for every mask (measured), so the paper's defaults (predicted IoU ≥ 0.88,
stability ≥ 0.95) keep nothing, and its near-identical random masks collapse to one under box NMS
0.7. The test keeps every mask (thresholds 0, NMS 1.0) to exercise the whole path with several
segments. SAM's encoder always works at 1024 px, so one call costs ~45 s on 2 CPU cores; the
test makes a single call (4×4 points on a 128×96 image, SAM at half resolution).
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.sam


@pytest.fixture(scope="module")
def image():
    from pathlib import Path
    import os

    from PIL import Image

    data = Path(os.environ.get("VPRKIT_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"))
    return np.asarray(Image.open(data / "corridor" / "ref" / "0000010.jpg").convert("RGB").resize((128, 96)))


def test_random_sam_masks_feed_supersegments(image):
    import segment_anything  # noqa: F401  (the point of this test: fail loudly where SAM is missing)
    import torchvision  # noqa: F401

    from vprkit.segments import build_segmenter
    from vprkit.segments.graph import supersegments
    from vprkit.segments.retriever import segment_graph
    from vprkit.segments.supersegments import supersegment_vlad

    seg = build_segmenter(
        "sam",
        checkpoint=None,
        allow_random=True,
        model_type="vit_b",
        points_per_side=4,
        points_per_batch=16,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
        scale=0.5,
    )
    assert seg.generator_options["points_per_side"] == 4
    masks = seg(image)
    # masks come back at the prepared-image size although SAM ran at half resolution
    assert masks.dtype == bool and masks.shape[1:] == (96, 128)
    assert len(masks) >= 2 and masks.any(axis=(1, 2)).all()
    grid, stride = (6, 8), 16
    sp, cents, a = segment_graph(masks, grid, stride, "rest")
    assert sp.any(0).all() and a.shape == (len(sp), len(sp))
    members = supersegments(sp, a, 3)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(grid[0] * grid[1], 16)).astype(np.float32)
    centres = rng.normal(size=(4, 16)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    desc = supersegment_vlad(feats, members, centres)
    assert desc.shape == (len(sp), 64)
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1, atol=1e-5)


def test_sam_configuration_errors(tmp_path):
    from vprkit.errors import ConfigError, WeightsNotFoundError
    from vprkit.segments import build_segmenter

    with pytest.raises(ConfigError):
        build_segmenter("sam")
    with pytest.raises(WeightsNotFoundError):
        build_segmenter("sam", checkpoint=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError):
        build_segmenter("sam", checkpoint=None, allow_random=True, model_type="vit_x")
