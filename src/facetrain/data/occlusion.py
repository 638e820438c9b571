"""Face-specific occlusion for aligned faces: synthetic face masks and face-part erasing.

Aligned faces put their landmarks where the ArcFace 5-point template says (at 112x112: left eye (38.29, 51.70),
right eye (73.53, 51.50), nose (56.03, 71.74), mouth corners (41.55, 92.37) and (70.73, 92.20)), so occluders can be
placed on the right part of the face without running a detector:

- :class:`FaceMaskOcclusion` draws a synthetic medical/cloth mask over the lower face (the masked-face-recognition
  recipe: random mask shapes, colours, textures and shading over the region from the nose line to the chin). It
  never changes a pixel above the nose line.
- :class:`FacePartErasing` erases an eye, both eyes, the nose or the mouth region (a box around the landmark, its
  size jittered by at most ``JITTER``) with a random colour, noise or the image mean.

Both work on uint8 HxWx3 RGB images of any size (landmarks scale with it), take a ``numpy.random.Generator``, and are
plain picklable objects (no albumentations needed). Landmarks may be passed explicitly for unaligned crops.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from facetrain.errors import DataError

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "FACE_PARTS",
    "JITTER",
    "FaceMaskOcclusion",
    "FacePartErasing",
    "draw_face_mask",
    "erase_face_part",
    "face_landmarks",
    "nose_line",
    "part_box",
]

# The ArcFace 5-point template at 112x112 (x, y): left eye, right eye, nose tip, left and right mouth corners.
# (Duplicated from facetrain.align.template on purpose: `data` does not depend on `align`.)
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

FACE_PARTS = ("left_eye", "right_eye", "eyes", "nose", "mouth")
JITTER = 0.15  # maximum relative change of a part box's width/height and of its centre (fraction of the size)

_MASK_STYLES = ("surgical", "cloth", "n95")
_MASK_COLOURS = np.array(
    [
        [235, 238, 240],  # white
        [160, 200, 225],  # surgical light blue
        [110, 170, 210],  # blue
        [30, 30, 35],  # black
        [120, 120, 125],  # grey
        [220, 170, 185],  # pink
        [90, 110, 80],  # khaki
    ],
    dtype=np.float64,
)


def face_landmarks(height: int, width: int) -> np.ndarray:
    """The template landmarks scaled to an aligned ``height`` x ``width`` image.

    Returns:
        (5, 2) float64 (x, y) in pixels.
    """
    return ARCFACE_TEMPLATE_112 * np.array([width / 112.0, height / 112.0])


def nose_line(height: int, landmarks: np.ndarray | None = None) -> int:
    """First row a face mask may cover: the row of the nose-tip landmark (rounded up).

    Args:
        height: image height (used to scale the template when ``landmarks`` is None).
        landmarks: (5, 2) landmarks, or None for the aligned template.
    """
    y = landmarks[2, 1] if landmarks is not None else ARCFACE_TEMPLATE_112[2, 1] * height / 112.0
    return int(np.ceil(y))


def part_box(
    part: str, height: int, width: int, landmarks: np.ndarray | None = None
) -> tuple[float, float, float, float]:
    """Nominal (unjittered) box ``(x0, y0, x1, y1)`` of a face part, in pixels.

    Sizes are relative to the inter-eye distance ``d`` (35.2 px at 112x112): an eye box is 0.65d x 0.45d around
    the eye; ``eyes`` spans both eyes (a sunglasses band); ``nose`` is 0.55d wide from 0.45d above the tip to 0.2d
    below it; ``mouth`` spans the mouth corners plus 0.2d either side and 0.3d above/below.

    Args:
        part: one of :data:`FACE_PARTS`.
        height, width: image size.
        landmarks: (5, 2) landmarks, or None for the aligned template.
    """
    pts = face_landmarks(height, width) if landmarks is None else np.asarray(landmarks, dtype=np.float64)
    d = float(np.hypot(*(pts[1] - pts[0])))
    if part in ("left_eye", "right_eye"):
        (x, y) = pts[0] if part == "left_eye" else pts[1]
        return x - 0.325 * d, y - 0.225 * d, x + 0.325 * d, y + 0.225 * d
    if part == "eyes":
        y = (pts[0, 1] + pts[1, 1]) / 2
        return pts[0, 0] - 0.35 * d, y - 0.25 * d, pts[1, 0] + 0.35 * d, y + 0.25 * d
    if part == "nose":
        x, y = pts[2]
        return x - 0.275 * d, y - 0.45 * d, x + 0.275 * d, y + 0.2 * d
    if part == "mouth":
        y = (pts[3, 1] + pts[4, 1]) / 2
        return pts[3, 0] - 0.2 * d, y - 0.3 * d, pts[4, 0] + 0.2 * d, y + 0.3 * d
    raise DataError(f"unknown face part {part!r}; choose one of {', '.join(FACE_PARTS)}")


def erase_face_part(
    image: np.ndarray,
    part: str,
    rng: np.random.Generator,
    *,
    fill: str | Sequence[int] = "random",
    landmarks: np.ndarray | None = None,
) -> np.ndarray:
    """Return a copy of ``image`` with one face part erased.

    The nominal :func:`part_box` is jittered: width and height scaled by a factor in ``[1 - JITTER, 1 + JITTER]`` and
    the centre moved by at most ``JITTER / 2`` of the nominal size, so the erased area stays within the nominal box
    grown by ``JITTER`` of its size on every side.

    Args:
        image: (H, W, 3) uint8 RGB.
        part: one of :data:`FACE_PARTS`.
        rng: random generator.
        fill: ``"random"`` (one of colour / noise / image mean), ``"colour"``, ``"noise"``, ``"mean"``, or an RGB
            triple.
        landmarks: (5, 2) landmarks, or None for the aligned template.
    """
    _check_image(image)
    h, w = image.shape[:2]
    x0, y0, x1, y1 = part_box(part, h, w, landmarks)
    bw, bh = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2 + rng.uniform(-JITTER / 2, JITTER / 2) * bw
    cy = (y0 + y1) / 2 + rng.uniform(-JITTER / 2, JITTER / 2) * bh
    bw *= rng.uniform(1 - JITTER, 1 + JITTER)
    bh *= rng.uniform(1 - JITTER, 1 + JITTER)
    # Stay inside the grown nominal box even with both jitters at their maximum.
    gx0, gy0 = x0 - JITTER * (x1 - x0), y0 - JITTER * (y1 - y0)
    gx1, gy1 = x1 + JITTER * (x1 - x0), y1 + JITTER * (y1 - y0)
    c0 = int(np.clip(np.ceil(max(cx - bw / 2, gx0)), 0, w))
    c1 = int(np.clip(np.floor(min(cx + bw / 2, gx1)), 0, w))
    r0 = int(np.clip(np.ceil(max(cy - bh / 2, gy0)), 0, h))
    r1 = int(np.clip(np.floor(min(cy + bh / 2, gy1)), 0, h))
    out = image.copy()
    if c1 <= c0 or r1 <= r0:
        return out
    out[r0:r1, c0:c1] = _fill(image, (r1 - r0, c1 - c0), fill, rng)
    return out


def draw_face_mask(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    style: str | None = None,
    landmarks: np.ndarray | None = None,
) -> np.ndarray:
    """Return a copy of ``image`` wearing a synthetic face mask over the lower face.

    The mask's top edge runs from cheek to cheek through a point on or below the nose line (random height in
    ``[nose, nose + 0.15 * (mouth - nose)]``), its sides follow the jaw and its bottom passes under the chin.
    Colour, texture (plain, pleats, cloth weave, dots, noise) and a soft vertical shading are random.

    Args:
        image: (H, W, 3) uint8 RGB.
        rng: random generator.
        style: ``"surgical"`` (trapezoid with pleats), ``"cloth"`` (rounded), ``"n95"`` (pointed), or None (random).
        landmarks: (5, 2) landmarks, or None for the aligned template.
    """
    _check_image(image)
    h, w = image.shape[:2]
    if style is None:
        style = _MASK_STYLES[int(rng.integers(len(_MASK_STYLES)))]
    elif style not in _MASK_STYLES:
        raise DataError(f"unknown mask style {style!r}; choose one of {', '.join(_MASK_STYLES)}")
    pts = face_landmarks(h, w) if landmarks is None else np.asarray(landmarks, dtype=np.float64)
    region = _mask_region(pts, h, w, style, rng)
    out = image.copy()
    rows, cols = np.nonzero(region.any(1))[0], np.nonzero(region.any(0))[0]
    if rows.size == 0:
        return out
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1  # texture only the mask's bounding box
    texture = _mask_texture((r0, r1, c0, c1), h, style, rng)
    box = region[r0:r1, c0:c1]
    out[r0:r1, c0:c1][box] = texture[box]
    return out


class FaceMaskOcclusion:
    """Augmentation: with probability ``p`` draw a synthetic face mask (see :func:`draw_face_mask`).

    Args:
        p: probability of applying.
        styles: mask styles to draw from (default all).
    """

    def __init__(self, p: float = 0.5, styles: Sequence[str] = _MASK_STYLES) -> None:
        self.p, self.styles = float(p), tuple(styles)
        for s in self.styles:
            if s not in _MASK_STYLES:
                raise DataError(f"unknown mask style {s!r}; choose from {', '.join(_MASK_STYLES)}")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return image
        return draw_face_mask(image, rng, style=self.styles[int(rng.integers(len(self.styles)))])

    def __repr__(self) -> str:
        return f"FaceMaskOcclusion(p={self.p}, styles={self.styles})"


class FacePartErasing:
    """Augmentation: with probability ``p`` erase one face part chosen uniformly from ``parts``.

    Args:
        p: probability of applying.
        parts: parts to choose from (default: left_eye, right_eye, eyes, nose, mouth).
        fill: see :func:`erase_face_part`.
    """

    def __init__(self, p: float = 0.5, parts: Sequence[str] = FACE_PARTS, fill: str | Sequence[int] = "random") -> None:
        self.p, self.parts, self.fill = float(p), tuple(parts), fill
        for part in self.parts:
            if part not in FACE_PARTS:
                raise DataError(f"unknown face part {part!r}; choose from {', '.join(FACE_PARTS)}")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return image
        part = self.parts[int(rng.integers(len(self.parts)))]
        return erase_face_part(image, part, rng, fill=self.fill)

    def __repr__(self) -> str:
        return f"FacePartErasing(p={self.p}, parts={self.parts})"


# -- helpers -----------------------------------------------------------------------------------------------------


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise DataError(f"occlusion expects a uint8 HxWx3 RGB image, got {got}")


def _fill(image: np.ndarray, shape: tuple[int, int], fill, rng: np.random.Generator) -> np.ndarray:
    if fill == "random":
        fill = ("colour", "noise", "mean")[int(rng.integers(3))]
    if fill == "colour":
        return np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (*shape, 3))
    if fill == "noise":
        return rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    if fill == "mean":
        return np.broadcast_to(image.reshape(-1, 3).mean(0).round().astype(np.uint8), (*shape, 3))
    if isinstance(fill, str):
        raise DataError(f"unknown fill {fill!r}; use random, colour, noise, mean or an RGB triple")
    return np.broadcast_to(np.asarray(fill, dtype=np.uint8).reshape(3), (*shape, 3))


def _mask_region(pts: np.ndarray, h: int, w: int, style: str, rng: np.random.Generator) -> np.ndarray:
    """Boolean (H, W) region of the mask; rows above the nose line are always False."""
    d = float(np.hypot(*(pts[1] - pts[0])))
    nose_x, nose_y = pts[2]
    mouth_y = (pts[3, 1] + pts[4, 1]) / 2
    top = nose_line(h, pts) + rng.uniform(0.0, 0.15) * (mouth_y - nose_y)
    cx = nose_x
    half = d * rng.uniform(1.05, 1.25)  # half width at the cheeks
    cheek_y = top + rng.uniform(0.0, 0.2) * (mouth_y - nose_y)
    chin_y = mouth_y + (mouth_y - nose_y) * rng.uniform(0.9, 1.3)
    jaw_y = mouth_y + (mouth_y - nose_y) * rng.uniform(0.2, 0.5)
    if style == "surgical":
        poly = [(cx - half, cheek_y), (cx, top), (cx + half, cheek_y), (cx + half * 0.95, jaw_y),
                (cx + half * 0.55, chin_y), (cx - half * 0.55, chin_y), (cx - half * 0.95, jaw_y)]  # fmt: skip
    elif style == "n95":
        poly = [(cx - half * 0.9, cheek_y), (cx, top), (cx + half * 0.9, cheek_y), (cx + half * 0.8, jaw_y),
                (cx, chin_y), (cx - half * 0.8, jaw_y)]  # fmt: skip
    else:  # cloth: rounded bottom
        t = np.linspace(0, np.pi, 16)
        bottom = [(cx + half * 0.95 * np.cos(a), jaw_y + (chin_y - jaw_y) * np.sin(a)) for a in t]
        poly = [(cx - half, cheek_y), (cx, top), (cx + half, cheek_y), *bottom]
    poly_px = np.round(np.array(poly, dtype=np.float64)).astype(np.int32)
    canvas = np.zeros((h, w), dtype=np.uint8)
    cv2.fillPoly(canvas, [poly_px], 255, lineType=cv2.LINE_8)
    canvas[: nose_line(h, pts)] = 0  # never above the nose line, whatever the rounding
    return canvas > 0


def _mask_texture(box: tuple[int, int, int, int], height: int, style: str, rng: np.random.Generator) -> np.ndarray:
    """A uint8 textured, shaded fabric covering rows ``r0:r1`` and columns ``c0:c1`` of a ``height``-row image."""
    r0, r1, c0, c1 = box
    h, w = height, height  # pattern periods scale with the image (aligned faces are square)
    if rng.random() < 0.2:
        base = rng.uniform(20, 240, 3)
    else:
        base = _MASK_COLOURS[int(rng.integers(len(_MASK_COLOURS)))] + rng.normal(0, 8, 3)
    yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    tex = np.broadcast_to(base.astype(np.float32), (*yy.shape, 3)).copy()
    kind = (
        "pleats"
        if style == "surgical" and rng.random() < 0.7
        else ("plain", "weave", "dots", "noise")[int(rng.integers(4))]
    )
    if kind == "pleats":
        period = max(h / rng.uniform(12, 20), 2.0)
        tex -= (np.sin(2 * np.pi * yy / period) > 0.6)[..., None] * rng.uniform(15, 35)
    elif kind == "weave":
        period = max(w / rng.uniform(25, 45), 2.0)
        tex += (np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period))[..., None] * rng.uniform(8, 20)
    elif kind == "dots":
        period = max(w / rng.uniform(8, 14), 3.0)
        dots = (np.hypot((xx % period) - period / 2, (yy % period) - period / 2) < period * 0.22)[..., None]
        tex = np.where(dots, rng.uniform(0, 255, 3), tex)
    elif kind == "noise":
        tex += rng.normal(0, rng.uniform(6, 16), (*yy.shape, 1)).astype(np.float32)
    tex *= (1.0 - 0.18 * (yy / h) ** 2)[..., None] * rng.uniform(0.9, 1.05)  # shading towards the chin
    return np.clip(tex, 0, 255).astype(np.uint8)
