"""ArcFace template alignment against an independent float64 solution (complex least squares) and real photos."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facetrain.align.template import (
    ARCFACE_TEMPLATE,
    estimate_norm,
    estimate_similarity,
    invert_transform,
    norm_crop,
    template_for_size,
    transform_points,
)


def complex_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Reference: a similarity without reflection is z -> a z + b over complex numbers; solve for (a, b) by lstsq."""
    z = src[:, 0] + 1j * src[:, 1]
    w = dst[:, 0] + 1j * dst[:, 1]
    design = np.stack([z, np.ones_like(z)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, w, rcond=None)
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


points = st.lists(st.tuples(st.floats(-500, 500), st.floats(-500, 500)), min_size=3, max_size=8).map(
    lambda p: np.array(p, dtype=np.float64)
)


@settings(max_examples=60, deadline=None)
@given(src=points, angle=st.floats(-np.pi, np.pi), scale=st.floats(0.05, 20), noise_seed=st.integers(0, 2**16))
def test_estimate_similarity_matches_complex_least_squares(src, angle, scale, noise_seed):
    if np.ptp(src, axis=0).max() < 1.0:
        return  # (nearly) coincident points: no well-defined transform
    rng = np.random.default_rng(noise_seed)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ rot.T + rng.normal(0, 50, size=2) + rng.normal(0, 2.0, size=src.shape)
    got = estimate_similarity(src, dst)
    want = complex_similarity(src, dst)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-6 * (1 + np.abs(want).max()))


def test_exact_similarity_is_recovered_and_never_reflects():
    src = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 5.0], [7.0, 3.0]])
    m = np.array([[0.0, -2.0, 3.0], [2.0, 0.0, -1.0]])  # rotate 90 degrees, scale 2, shift
    np.testing.assert_allclose(estimate_similarity(src, transform_points(src, m)), m, atol=1e-12)
    mirrored = src * [-1, 1]
    got = estimate_similarity(src, mirrored)
    assert np.linalg.det(got[:, :2]) > 0  # the best proper similarity, not the reflection
    np.testing.assert_allclose(got, complex_similarity(src, mirrored), atol=1e-9)


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="coincide"):
        estimate_similarity(np.ones((5, 2)), ARCFACE_TEMPLATE)
    with pytest.raises(ValueError, match="shape"):
        estimate_norm(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="multiple of 112 or 128"):
        template_for_size(100)
    with pytest.raises(ValueError, match="mode"):
        estimate_norm(ARCFACE_TEMPLATE, mode="other")


@pytest.mark.parametrize("size", [112, 224, 128, 256])
def test_template_scaling_follows_insightface(size):
    if size % 112 == 0:
        want = ARCFACE_TEMPLATE * (size / 112)
    else:
        want = ARCFACE_TEMPLATE * (size / 128) + [8 * size / 128, 0]
    np.testing.assert_allclose(template_for_size(size), want)
    # estimate_norm uses the template rounded to float32, as InsightFace does: 1e-5 px of difference
    np.testing.assert_allclose(
        estimate_norm(ARCFACE_TEMPLATE, size), complex_similarity(ARCFACE_TEMPLATE, want), atol=1e-5
    )


def test_norm_crop_equals_warp_with_reference_matrix_and_zero_border():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(300, 260, 3), dtype=np.uint8)
    landmarks = ARCFACE_TEMPLATE * 1.7 + [20, 90] + rng.normal(0, 1.5, size=(5, 2))
    for size in (112, 128):
        reference = cv2.warpAffine(
            img, complex_similarity(landmarks, template_for_size(size)), (size, size), borderValue=0.0
        )
        got = norm_crop(img, landmarks, size)
        assert got.shape == (size, size, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - reference).max() <= 1
    # a face at the photo's corner: the part outside the photo is black
    corner = norm_crop(img, ARCFACE_TEMPLATE - 60)
    assert (corner[:20, :20] == 0).all()


def test_inverse_maps_points_back():
    m = estimate_norm(ARCFACE_TEMPLATE * 2.3 + [50, 70])
    pts = np.random.default_rng(1).uniform(0, 112, size=(10, 2))
    np.testing.assert_allclose(transform_points(transform_points(pts, m), invert_transform(m)), pts, atol=1e-9)
    with pytest.raises(ValueError):
        invert_transform(np.eye(3))


@pytest.mark.realdata
def test_real_landmarks_land_on_template_and_crops_match_reference(assets_dir):
    from facetrain.align.exif import read_image

    annotations = json.loads((assets_dir / "annotations.json").read_text())["images"]
    residuals, correlations = [], []
    for name, entry in annotations.items():
        image = read_image(assets_dir / "images" / name)
        for face in entry["faces"]:
            landmarks = np.array(face["landmarks5"], dtype=np.float64)
            m = estimate_norm(landmarks)
            mapped = transform_points(landmarks, m)
            residuals.append(np.linalg.norm(mapped - ARCFACE_TEMPLATE, axis=1).mean())
            # optimal in the least-squares sense: no worse than the independent solution
            best = transform_points(landmarks, complex_similarity(landmarks, ARCFACE_TEMPLATE))
            assert ((mapped - ARCFACE_TEMPLATE) ** 2).sum() <= ((best - ARCFACE_TEMPLATE) ** 2).sum() + 1e-9
            reference = cv2.cvtColor(cv2.imread(str(assets_dir / face["aligned112"])), cv2.COLOR_BGR2RGB)
            crop = norm_crop(image, landmarks)
            correlations.append(np.corrcoef(crop.ravel().astype(float), reference.ravel().astype(float))[0, 1])
    assert len(correlations) == 28
    assert np.median(residuals) < 5.0 and max(residuals) < 20.0  # pixels in the 112 crop (real faces vary)
    # the annotations' landmarks are truncated to whole pixels while the reference crops used the detector's
    # sub-pixel ones, so sharp photos differ a little; most crops are identical up to rounding
    assert np.median(correlations) > 0.999 and min(correlations) > 0.9


@pytest.mark.filterwarnings("ignore::FutureWarning")  # skimage 0.26 deprecates .estimate, which InsightFace calls
def test_bit_identical_to_insightface_recipe_when_scikit_image_is_installed():
    """InsightFace's estimate_norm: float32 template x ratio, skimage SimilarityTransform.estimate (optional check)."""
    transform = pytest.importorskip("skimage.transform")
    template32 = np.array(ARCFACE_TEMPLATE, dtype=np.float32)
    rng = np.random.default_rng(3)
    for size in (112, 128, 224, 256):
        ratio = size / 112.0 if size % 112 == 0 else size / 128.0
        dst = template32 * ratio
        dst[:, 0] += 0.0 if size % 112 == 0 else 8.0 * ratio
        for dtype in (np.float32, np.float64):
            landmarks = ARCFACE_TEMPLATE * rng.uniform(1, 5) + rng.uniform(0, 500, 2) + rng.normal(0, 3, (5, 2))
            landmarks = landmarks.astype(dtype)
            tform = transform.SimilarityTransform()
            tform.estimate(landmarks, dst)
            np.testing.assert_array_equal(estimate_norm(landmarks, size), tform.params[:2])
