"""ArcFace 5-point template alignment: similarity estimation and InsightFace-exact ``norm_crop``.

The similarity transform is the least-squares solution of Umeyama (1991), "Least-squares estimation of
transformation parameters between two point patterns", IEEE TPAMI 13(4), with reflections excluded: the same
estimator scikit-image's ``SimilarityTransform.estimate`` uses, which is what InsightFace's
``utils/face_align.norm_crop`` calls, so crops made here match InsightFace's pixel for pixel.
"""

from __future__ import annotations

import cv2
import numpy as np

#: ArcFace 112x112 template (x, y): eye on the image's left, eye on the image's right, nose tip,
#: mouth corner on the image's left, mouth corner on the image's right.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ARCFACE_TEMPLATE.setflags(write=False)
_TEMPLATE_FLOAT32 = ARCFACE_TEMPLATE.astype(np.float32)


def norm_crop(img: np.ndarray, landmarks: np.ndarray, image_size: int = 112, mode: str = "arcface") -> np.ndarray:
    """Warp a face so its 5 landmarks land on the ArcFace template (InsightFace ``face_align.norm_crop``).

    Args:
        img: image (H, W, C) or (H, W), any dtype ``cv2.warpAffine`` accepts; channel order is kept.
        landmarks: (5, 2) points in the template's order, image pixel coordinates.
        image_size: output side; a multiple of 112, or of 128 (then the template is scaled by size/128 and shifted
            right by 8*size/128 pixels, as InsightFace does).
        mode: only ``"arcface"``.

    Returns:
        The aligned face (image_size, image_size[, C]), same dtype; pixels outside the photo are 0.
    """
    matrix = estimate_norm(landmarks, image_size, mode)
    return cv2.warpAffine(img, matrix, (image_size, image_size), borderValue=0.0)


def estimate_norm(landmarks: np.ndarray, image_size: int = 112, mode: str = "arcface") -> np.ndarray:
    """The (2, 3) float64 similarity that maps ``landmarks`` onto the template scaled to ``image_size``.

    Raises:
        ValueError: bad landmark shape, an unsupported size or mode, or degenerate (coincident) landmarks.
    """
    if mode != "arcface":
        raise ValueError(f"norm_crop mode {mode!r} is not supported; use mode='arcface'")
    points = _as_float_points(landmarks)
    if points.shape != (5, 2):
        raise ValueError(f"landmarks must have shape (5, 2), got {points.shape}")
    return estimate_similarity(points, _template_float32(image_size))


def template_for_size(image_size: int) -> np.ndarray:
    """The ArcFace template (5, 2) for an output side that is a multiple of 112 or of 128 (InsightFace rule)."""
    if image_size <= 0 or (image_size % 112 and image_size % 128):
        raise ValueError(f"image_size must be a positive multiple of 112 or 128, got {image_size}")
    if image_size % 112 == 0:
        ratio, shift_x = image_size / 112.0, 0.0
    else:
        ratio = image_size / 128.0
        shift_x = 8.0 * ratio
    template = ARCFACE_TEMPLATE * ratio
    template[:, 0] += shift_x
    return template


def _template_float32(image_size: int) -> np.ndarray:
    # InsightFace keeps the template in float32 and scales it there; doing the same gives bit-identical matrices
    template_for_size(image_size)  # validates the size
    ratio = image_size / 112.0 if image_size % 112 == 0 else image_size / 128.0
    template = _TEMPLATE_FLOAT32 * np.float32(ratio)
    if image_size % 112:
        template[:, 0] += np.float32(8.0 * ratio)
    return template


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping ``src`` to ``dst``.

    Umeyama (1991), eq. 38-42: with centred point sets and ``Sigma = dst_c^T src_c / N = U D V^T``,
    ``R = U S V^T`` (``S = diag(1, sign)`` so that ``det R = +1``), ``c = tr(D S) / var(src)``,
    ``t = mean(dst) - c R mean(src)``. Inputs keep their float dtype for the means (float32 landmarks or template
    give the same matrix as InsightFace's scikit-image call, to the last bit: when both are float32 the covariance
    and its SVD are float32 there too); the result is float64.

    Args:
        src: (N, 2) source points, N >= 2.
        dst: (N, 2) destination points.

    Returns:
        (2, 3) float64 matrix ``[c R | t]`` such that ``dst ~= src @ (c R)^T + t``.

    Raises:
        ValueError: mismatched shapes, fewer than 2 points, non-finite values, or all source points coincident.
    """
    src, dst = _as_float_points(src), _as_float_points(dst)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"src and dst must both be (N>=2, 2) arrays, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("src and dst must be finite")
    n = src.shape[0]
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = src_c.var(axis=0).sum()
    if float(src_var) <= 1e-12 * max(1.0, float(np.abs(src).max())) ** 2:
        raise ValueError("degenerate landmarks: all source points coincide")
    covariance = dst_c.T @ src_c / n  # eq. 38
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # eq. 39/43: exclude reflections
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt  # eq. 40
    scale = 1.0 / src_var * (singular @ sign)  # eq. 42
    matrix = np.empty((2, 3), dtype=np.float64)
    matrix[:, 2] = dst_mean - scale * (rotation @ src_mean.T)  # eq. 41
    matrix[:, :2] = rotation * scale
    return matrix


def _as_float_points(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points)
    return points if np.issubdtype(points.dtype, np.floating) else points.astype(np.float64)


def invert_transform(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine map (e.g. aligned-crop pixels back to photo pixels)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (2, 3):
        raise ValueError(f"affine matrix must be (2, 3), got {matrix.shape}")
    linear_inv = np.linalg.inv(matrix[:, :2])
    out = np.empty((2, 3), dtype=np.float64)
    out[:, :2] = linear_inv
    out[:, 2] = -linear_inv @ matrix[:, 2]
    return out


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine map to (N, 2) points; returns (N, 2) float64."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    matrix = np.asarray(matrix, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]
