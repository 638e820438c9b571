"""Synthetic face-like identities: a learnable, deterministic stand-in for an aligned face dataset.

Every identity is a set of structural parameters (face shape, skin tone, eye / brow / nose / mouth geometry, hair,
facial hair, glasses, moles) drawn from the identity seed ``(seed, identity_offset + k)``. Every image of an identity
re-renders those parameters under per-image nuisance drawn from ``(seed, identity_offset + k, j)``: expression-like
landmark jitter, pose (rotation / shift / scale), background, lighting gradient, brightness / contrast / colour cast,
blur, Gaussian noise and a random occluding patch. Features sit near the ArcFace 112x112 5-point template
(eyes ~(38,52)/(73,52), nose ~(56,72), mouth corners ~(41,92)/(70,92)), so images look like aligned faces.

Image ``i`` depends only on ``(seed, identity_offset, images_per_identity, i)``, never on which worker renders it or in
what order, so a dataset is reproducible byte for byte (with the same OpenCV and numpy versions; another OpenCV may
anti-alias an edge pixel differently). Rendering uses OpenCV drawing + numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "SyntheticIdentities",
    "make_verification_pairs",
    "render_identity_grid",
    "render_face",
]

# Canonical drawing frame is 112x112; other sizes are reached by the final affine warp.
_CANVAS = 112
# Stream tags keep the identity stream and the per-image stream of the same numbers apart.
_IDENTITY_STREAM = 0x1D
_IMAGE_STREAM = 0x1A
_PAIR_STREAM = 0x9A

_SKIN_TONES = np.array(  # RGB anchors from light to dark; an identity interpolates between neighbours.
    [[245, 215, 190], [234, 192, 160], [214, 165, 128], [188, 134, 98], [150, 100, 70], [105, 70, 50]],
    dtype=np.float32,
)
_HAIR_COLOURS = np.array(
    [[20, 15, 12], [60, 40, 25], [110, 75, 40], [170, 130, 80], [215, 190, 130], [130, 45, 25], [150, 150, 150]],
    dtype=np.float32,
)
_IRIS_COLOURS = np.array([[70, 45, 25], [40, 90, 140], [60, 110, 60], [110, 90, 60], [30, 25, 20]], dtype=np.float32)


@dataclass(frozen=True)
class _Identity:
    """Structural parameters of one identity, in the 112x112 canonical frame (pixels, RGB 0..255)."""

    skin: np.ndarray  # (3,)
    face_centre: tuple[float, float]
    face_axes: tuple[float, float]
    jaw_width: float  # 0 (pointed chin) .. 1 (square jaw)
    eye_left: tuple[float, float]
    eye_right: tuple[float, float]
    eye_size: tuple[float, float]  # half width, half height
    iris_colour: np.ndarray
    brow_lift: float
    brow_tilt: float
    brow_thickness: int
    brow_length: float
    nose_tip: tuple[float, float]
    nose_width: float
    nose_length: float
    mouth_left: tuple[float, float]
    mouth_right: tuple[float, float]
    lip_thickness: float
    lip_colour: np.ndarray
    hair_colour: np.ndarray
    hair_style: int  # 0 short cap, 1 fringe, 2 long sides, 3 bald, 4 side parting
    hairline: float
    beard: int  # 0 none, 1 moustache, 2 full beard, 3 goatee
    glasses: int  # 0 none, 1 round, 2 square
    glasses_colour: np.ndarray
    moles: tuple[tuple[float, float, float], ...]  # (x, y, radius)
    cheek_shade: float


class SyntheticIdentities:
    """A dataset of ``num_identities x images_per_identity`` synthetic aligned faces.

    Image ``i`` shows identity ``i // images_per_identity`` (its label), rendered with nuisance
    ``i % images_per_identity``. Identity ``k`` is drawn from the identity seed ``(seed, identity_offset + k)``, so two
    datasets with the same ``seed`` and disjoint ``[identity_offset, identity_offset + num_identities)`` ranges share no
    identity (use that for held-out verification identities).

    Args:
        num_identities: number of identities (classes), > 0.
        images_per_identity: images rendered per identity, > 0.
        seed: base seed; the same seed gives byte-identical images.
        image_size: output side in pixels (square); features scale with it.
        identity_offset: first identity index in the global identity space.

    ``dataset[i]`` returns ``(image (image_size, image_size, 3) uint8 RGB, label int)``.
    """

    def __init__(
        self,
        num_identities: int,
        images_per_identity: int,
        *,
        seed: int = 0,
        image_size: int = 112,
        identity_offset: int = 0,
    ) -> None:
        if num_identities <= 0 or images_per_identity <= 0:
            raise ValueError(
                f"num_identities ({num_identities}) and images_per_identity ({images_per_identity}) must be > 0"
            )
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if seed < 0 or identity_offset < 0:
            raise ValueError(f"seed ({seed}) and identity_offset ({identity_offset}) must be >= 0")
        self.num_identities = int(num_identities)
        self.images_per_identity = int(images_per_identity)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.identity_offset = int(identity_offset)

    @property
    def num_classes(self) -> int:
        """Number of identities (labels are ``0 .. num_classes - 1``)."""
        return self.num_identities

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for SyntheticIdentities of length {len(self)}")
        index = int(index) % len(self)
        label, variant = divmod(index, self.images_per_identity)
        image = render_face(self.seed, self.identity_offset + label, variant, image_size=self.image_size)
        return image, label

    def labels(self) -> np.ndarray:
        """Labels of every image, shape ``(len(self),)`` int64, without rendering anything."""
        return np.repeat(np.arange(self.num_identities, dtype=np.int64), self.images_per_identity)

    def __repr__(self) -> str:
        return (
            f"SyntheticIdentities(num_identities={self.num_identities}, images_per_identity="
            f"{self.images_per_identity}, seed={self.seed}, image_size={self.image_size}, "
            f"identity_offset={self.identity_offset})"
        )


def make_verification_pairs(
    num_pairs: int,
    *,
    num_identities: int = 100,
    seed: int = 0,
    identity_offset: int = 1_000_000,
    image_size: int = 112,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Verification pairs over ``num_identities`` identities starting at ``identity_offset``.

    Pair ``p`` is images ``2p`` and ``2p + 1``; even pairs are genuine (same identity, two different nuisance draws)
    and odd pairs impostors (two different identities), so every one of 10 contiguous folds holds both kinds in equal
    numbers when ``num_pairs`` is a multiple of 20. This is the layout of a verification ``.bin``.

    Args:
        num_pairs: number of pairs, even and >= 2.
        num_identities: identities the pairs are drawn from, >= 2.
        seed: base seed (the same seed as a training set gives the same identity space).
        identity_offset: first identity; keep it outside the training range to hold identities out.
        image_size: output side in pixels.

    Returns:
        ``(images, issame)``: ``2 * num_pairs`` RGB uint8 arrays and a bool array of shape ``(num_pairs,)``.
    """
    if num_pairs < 2 or num_pairs % 2:
        raise ValueError(f"num_pairs must be even and >= 2, got {num_pairs}")
    if num_identities < 2:
        raise ValueError(f"num_identities must be >= 2, got {num_identities}")
    rng = np.random.default_rng([seed, _PAIR_STREAM, identity_offset, num_identities])
    images: list[np.ndarray] = []
    issame = np.zeros(num_pairs, dtype=bool)
    # Nuisance variants for pairs come from a range no training set uses (variants there are < images_per_identity).
    variant_base = 1 << 20
    for p in range(num_pairs):
        genuine = p % 2 == 0
        first = int(rng.integers(num_identities))
        if genuine:
            second = first
        else:
            second = int(rng.integers(num_identities - 1))
            second += second >= first
        variant = variant_base + 2 * p
        images.append(render_face(seed, identity_offset + first, variant, image_size=image_size))
        images.append(render_face(seed, identity_offset + second, variant + 1, image_size=image_size))
        issame[p] = genuine
    return images, issame


def render_identity_grid(
    num_identities: int = 6,
    images_per_identity: int = 6,
    *,
    seed: int = 0,
    identity_offset: int = 0,
    image_size: int = 112,
) -> np.ndarray:
    """A picture for docs: one row per identity, one column per nuisance draw; RGB uint8 ``(H, W, 3)``."""
    rows = []
    for k in range(num_identities):
        row = [render_face(seed, identity_offset + k, j, image_size=image_size) for j in range(images_per_identity)]
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)


def render_face(seed: int, identity: int, variant: int, *, image_size: int = 112) -> np.ndarray:
    """Render one image of global identity ``identity`` with nuisance draw ``variant``.

    Returns:
        RGB uint8 array ``(image_size, image_size, 3)``; a pure function of its arguments.
    """
    ident = _draw_identity(np.random.default_rng([seed, _IDENTITY_STREAM, identity]))
    rng = np.random.default_rng([seed, _IMAGE_STREAM, identity, variant])
    return _render(ident, rng, image_size)


# ---------------------------------------------------------------------------------------------------------------------
# Identity parameters


def _pick_colour(rng: np.random.Generator, palette: np.ndarray, spread: float) -> np.ndarray:
    pos = rng.uniform(0, len(palette) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(palette) - 1)
    colour = palette[lo] * (1 - (pos - lo)) + palette[hi] * (pos - lo)
    return np.clip(colour + rng.normal(0, spread, 3), 0, 255).astype(np.float32)


def _draw_identity(rng: np.random.Generator) -> _Identity:
    eye_y = 52 + rng.uniform(-3, 3)
    eye_gap = rng.uniform(30, 40)  # template gap is 35.2
    eye_cx = 56 + rng.uniform(-1.5, 1.5)
    mouth_y = 92 + rng.uniform(-4, 4)
    mouth_w = rng.uniform(22, 36)  # template width is 29.2
    face_ax = rng.uniform(34, 44)
    face_ay = rng.uniform(46, 58)
    n_moles = int(rng.integers(0, 4))
    moles = tuple(
        (float(56 + rng.uniform(-28, 28)), float(70 + rng.uniform(-20, 28)), float(rng.uniform(1.0, 2.6)))
        for _ in range(n_moles)
    )
    return _Identity(
        skin=_pick_colour(rng, _SKIN_TONES, 10.0),
        face_centre=(56 + rng.uniform(-1.5, 1.5), 66 + rng.uniform(-3, 3)),
        face_axes=(face_ax, face_ay),
        jaw_width=float(rng.uniform(0, 1)),
        eye_left=(eye_cx - eye_gap / 2, eye_y + rng.uniform(-1, 1)),
        eye_right=(eye_cx + eye_gap / 2, eye_y + rng.uniform(-1, 1)),
        eye_size=(rng.uniform(5.5, 9.0), rng.uniform(2.2, 4.8)),
        iris_colour=_pick_colour(rng, _IRIS_COLOURS, 15.0),
        brow_lift=float(rng.uniform(6, 12)),
        brow_tilt=float(rng.uniform(-0.3, 0.3)),
        brow_thickness=int(rng.integers(1, 5)),
        brow_length=float(rng.uniform(8, 14)),
        nose_tip=(eye_cx + rng.uniform(-1.5, 1.5), 72 + rng.uniform(-4, 4)),
        nose_width=float(rng.uniform(5, 11)),
        nose_length=float(rng.uniform(12, 22)),
        mouth_left=(eye_cx - mouth_w / 2, mouth_y + rng.uniform(-1, 1)),
        mouth_right=(eye_cx + mouth_w / 2, mouth_y + rng.uniform(-1, 1)),
        lip_thickness=float(rng.uniform(1.5, 5.0)),
        lip_colour=np.clip(np.array([175, 85, 85]) + rng.normal(0, 25, 3), 0, 255).astype(np.float32),
        hair_colour=_pick_colour(rng, _HAIR_COLOURS, 12.0),
        hair_style=int(rng.integers(0, 5)),
        hairline=float(rng.uniform(24, 36)),
        beard=int(rng.choice(4, p=[0.55, 0.15, 0.2, 0.1])),
        glasses=int(rng.choice(3, p=[0.7, 0.15, 0.15])),
        glasses_colour=_pick_colour(rng, _HAIR_COLOURS, 30.0),
        moles=moles,
        cheek_shade=float(rng.uniform(-25, 25)),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def _pt(x: float, y: float) -> tuple[int, int]:
    # Drawing uses 4 fractional bits (shift=4) for sub-pixel geometry.
    return int(round(x * 16)), int(round(y * 16))


def _col(c: np.ndarray) -> tuple[float, float, float]:
    return float(c[0]), float(c[1]), float(c[2])


def _render(ident: _Identity, rng: np.random.Generator, image_size: int) -> np.ndarray:
    aa = cv2.LINE_AA
    # ---- per-image draws (all drawn up front so the stream layout is fixed) ----
    background = rng.uniform(20, 235, 3)
    bg_gradient = rng.uniform(-40, 40, 3)
    jit = rng.normal(0, 1.0, 12)  # expression-like landmark jitter (pixels)
    smile = rng.uniform(-2.5, 3.5)
    mouth_open = max(0.0, rng.normal(0, 1.5))
    brow_raise = rng.normal(0, 1.2)
    blink = rng.uniform() < 0.08
    gaze = rng.normal(0, 1.0, 2)
    hair_shift = rng.normal(0, 1.5)
    angle = rng.normal(0, 6.0)  # degrees
    scale = math.exp(rng.normal(0, 0.05))
    shift = rng.normal(0, 2.5, 2)
    yaw = rng.normal(0, 0.04)  # horizontal squash, a cheap stand-in for out-of-plane rotation
    light_dir = rng.uniform(0, 2 * math.pi)
    light_strength = rng.uniform(0, 0.45)
    brightness = rng.normal(0, 18)
    contrast = math.exp(rng.normal(0, 0.15))
    cast = rng.normal(0, 8, 3)
    blur_sigma = rng.choice([0.0, 0.0, 0.6, 1.0, 1.6])
    noise_sigma = rng.uniform(2, 10)
    occlude = rng.uniform() < 0.3
    occ_w, occ_h = rng.uniform(12, 40, 2)
    occ_x, occ_y = rng.uniform(10, 102, 2)
    occ_colour = rng.uniform(0, 255, 3)
    noise_offset = int(rng.integers(1 << 30))

    canvas = np.empty((_CANVAS, _CANVAS, 3), dtype=np.uint8)
    ramp = np.linspace(-0.5, 0.5, _CANVAS, dtype=np.float32)[:, None, None]
    canvas[:] = np.clip(background + ramp * bg_gradient, 0, 255).astype(np.uint8)

    fx, fy = ident.face_centre
    ax, ay = ident.face_axes
    hair = _col(ident.hair_colour)
    skin = ident.skin

    # Hair behind the face (long styles) and neck.
    neck_w = ax * 0.55
    cv2.rectangle(canvas, _pt(fx - neck_w, fy + ay * 0.6), _pt(fx + neck_w, _CANVAS + 2), _col(skin * 0.82), -1, aa, 4)
    if ident.hair_style == 2:
        cv2.ellipse(canvas, _pt(fx, fy + 6), _pt(ax + 7, ay + 8), 0, 180, 360, hair, -1, aa, 4)
        cv2.rectangle(canvas, _pt(fx - ax - 7, fy + 6), _pt(fx + ax + 7, fy + ay * 0.75), hair, -1, aa, 4)

    # Face: an ellipse plus a jaw polygon whose width sets chin shape.
    cv2.ellipse(canvas, _pt(fx, fy), _pt(ax, ay), 0, 0, 360, _col(skin), -1, aa, 4)
    jaw_half = ax * (0.35 + 0.5 * ident.jaw_width)
    jaw = np.array(
        [
            _pt(fx - ax * 0.98, fy + 4),
            _pt(fx - jaw_half, fy + ay * 0.92),
            _pt(fx, fy + ay + 1),
            _pt(fx + jaw_half, fy + ay * 0.92),
            _pt(fx + ax * 0.98, fy + 4),
        ],
        dtype=np.int32,
    )
    cv2.fillPoly(canvas, [jaw], _col(skin), aa, 4)
    # Cheek shading gives the face a per-identity relief.
    shade = _col(np.clip(skin + ident.cheek_shade, 0, 255))
    for side in (-1, 1):
        cv2.ellipse(canvas, _pt(fx + side * ax * 0.55, fy + 14), _pt(7, 9), 0, 0, 360, shade, -1, aa, 4)

    # Hair on top.
    top = fy - ay
    line = ident.hairline + hair_shift
    if ident.hair_style in (0, 1, 2, 4):
        cv2.ellipse(canvas, _pt(fx, fy - 4), _pt(ax + 3, ay + 3), 0, 180, 360, hair, -1, aa, 4)
        # Skin back below the hairline (forehead).
        cv2.ellipse(canvas, _pt(fx, fy - 4), _pt(ax - 5, fy - 4 - line), 0, 180, 360, _col(skin), -1, aa, 4)
        if ident.hair_style == 1:  # fringe
            cv2.rectangle(canvas, _pt(fx - ax + 6, top), _pt(fx + ax - 6, line + 8), hair, -1, aa, 4)
        if ident.hair_style == 4:  # side parting: a sweep over one side
            sweep = np.array([_pt(fx - ax, line - 2), _pt(fx + 4, line - 4), _pt(fx - ax + 2, line + 16)], np.int32)
            cv2.fillPoly(canvas, [sweep], hair, aa, 4)
    elif ident.hair_style == 3:  # bald with side hair
        for side in (-1, 1):
            cv2.ellipse(canvas, _pt(fx + side * (ax - 2), fy - 8), _pt(5, 14), 0, 0, 360, hair, -1, aa, 4)

    # Eyes (landmarks jittered per image).
    eyes = [
        (ident.eye_left[0] + jit[0], ident.eye_left[1] + jit[1]),
        (ident.eye_right[0] + jit[2], ident.eye_right[1] + jit[3]),
    ]
    ew, eh = ident.eye_size
    for ex, ey in eyes:
        if blink:
            cv2.line(canvas, _pt(ex - ew, ey), _pt(ex + ew, ey), (40, 30, 30), 1, aa, 4)
            continue
        cv2.ellipse(canvas, _pt(ex, ey), _pt(ew, eh), 0, 0, 360, (245, 245, 240), -1, aa, 4)
        iris_r = eh * 0.95
        ix, iy = ex + gaze[0], ey + gaze[1] * 0.4
        cv2.circle(canvas, _pt(ix, iy), int(iris_r * 16), _col(ident.iris_colour), -1, aa, 4)
        cv2.circle(canvas, _pt(ix, iy), int(iris_r * 0.45 * 16), (15, 10, 10), -1, aa, 4)
        cv2.ellipse(canvas, _pt(ex, ey), _pt(ew, eh), 0, 0, 360, (50, 35, 30), 1, aa, 4)

    # Brows.
    brow_colour = _col(ident.hair_colour * 0.8)
    for side, (ex, ey) in zip((-1, 1), eyes):
        by = ey - ident.brow_lift - brow_raise
        half = ident.brow_length / 2
        inner = (ex - side * half, by + side * ident.brow_tilt * half * -1)
        outer = (ex + side * half, by - side * ident.brow_tilt * half * -1 + 1.5)
        cv2.line(canvas, _pt(*inner), _pt(*outer), brow_colour, ident.brow_thickness, aa, 4)

    # Nose: bridge polyline + nostrils.
    nx, ny = ident.nose_tip[0] + jit[4], ident.nose_tip[1] + jit[5]
    nose_colour = _col(skin * 0.7)
    bridge = np.array(
        [_pt(nx - 1, ny - ident.nose_length), _pt(nx - ident.nose_width * 0.4, ny), _pt(nx, ny + 2)], np.int32
    )
    cv2.polylines(canvas, [bridge], False, nose_colour, 1, aa, 4)
    for side in (-1, 1):
        cv2.ellipse(
            canvas,
            _pt(nx + side * ident.nose_width * 0.45, ny + 1),
            _pt(2.2, 1.4),
            0,
            0,
            360,
            _col(skin * 0.5),
            -1,
            aa,
            4,
        )

    # Mouth: upper and lower lip as filled polygons; smile bends the corners, mouth_open separates the lips.
    mlx, mly = ident.mouth_left[0] + jit[6], ident.mouth_left[1] + jit[7] - smile
    mrx, mry = ident.mouth_right[0] + jit[8], ident.mouth_right[1] + jit[9] - smile
    mcx, mcy = (mlx + mrx) / 2, (mly + mry) / 2 + smile
    lip = ident.lip_thickness
    upper = np.array(
        [
            _pt(mlx, mly),
            _pt(mcx - 5, mcy - lip),
            _pt(mcx, mcy - lip * 0.6),
            _pt(mcx + 5, mcy - lip),
            _pt(mrx, mry),
            _pt(mcx, mcy),
        ],
        np.int32,
    )
    lower = np.array(
        [_pt(mlx, mly), _pt(mcx, mcy + mouth_open), _pt(mrx, mry), _pt(mcx, mcy + mouth_open + lip * 1.2)], np.int32
    )
    lip_colour = _col(ident.lip_colour)
    if mouth_open > 0.8:
        cv2.fillPoly(
            canvas,
            [np.array([_pt(mlx, mly), _pt(mcx, mcy), _pt(mrx, mry), _pt(mcx, mcy + mouth_open)], np.int32)],
            (60, 20, 25),
            aa,
            4,
        )
    cv2.fillPoly(canvas, [upper], lip_colour, aa, 4)
    cv2.fillPoly(canvas, [lower], lip_colour, aa, 4)

    # Facial hair.
    if ident.beard in (1, 2):
        cv2.ellipse(canvas, _pt(mcx, mcy - lip - 2), _pt((mrx - mlx) / 2 + 2, 2.5), 0, 0, 360, hair, -1, aa, 4)
    if ident.beard == 2:
        chin = np.array(
            [
                _pt(fx - ax * 0.9, fy + 10),
                _pt(mlx - 3, mcy + 2),
                _pt(mcx, mcy + lip + 4),
                _pt(mrx + 3, mcy + 2),
                _pt(fx + ax * 0.9, fy + 10),
                _pt(fx + jaw_half, fy + ay * 0.92),
                _pt(fx, fy + ay + 2),
                _pt(fx - jaw_half, fy + ay * 0.92),
            ],
            np.int32,
        )
        cv2.fillPoly(canvas, [chin], hair, aa, 4)
    if ident.beard == 3:
        cv2.ellipse(canvas, _pt(mcx, mcy + lip + 8), _pt(6, 7), 0, 0, 360, hair, -1, aa, 4)

    # Moles.
    for mx, my, mr in ident.moles:
        cv2.circle(canvas, _pt(mx, my), int(mr * 16), _col(skin * 0.45), -1, aa, 4)

    # Glasses.
    if ident.glasses:
        frame = _col(ident.glasses_colour)
        for ex, ey in eyes:
            if ident.glasses == 1:
                cv2.circle(canvas, _pt(ex, ey), int((ew + 3) * 16), frame, 2, aa, 4)
            else:
                cv2.rectangle(canvas, _pt(ex - ew - 3, ey - eh - 4), _pt(ex + ew + 3, ey + eh + 4), frame, 2, aa, 4)
        cv2.line(canvas, _pt(eyes[0][0] + ew + 3, eyes[0][1]), _pt(eyes[1][0] - ew - 3, eyes[1][1]), frame, 2, aa, 4)

    # Occluding patch (hand, scarf, sticker...).
    if occlude:
        cv2.rectangle(
            canvas,
            _pt(occ_x - occ_w / 2, occ_y - occ_h / 2),
            _pt(occ_x + occ_w / 2, occ_y + occ_h / 2),
            _col(occ_colour),
            -1,
            aa,
            4,
        )

    # Pose: rotation about the template centre, scale, shift, horizontal squash; resample to image_size.
    out_scale = image_size / _CANVAS
    rot = cv2.getRotationMatrix2D((56.0, 60.0), angle, scale)
    rot[0, :2] *= 1 + yaw
    rot[:, 2] += shift
    rot *= out_scale
    image = cv2.warpAffine(
        canvas, rot, (image_size, image_size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )

    # Photometric nuisance in float32: directional light, brightness / contrast / colour cast, blur, noise.
    img = image.astype(np.float32)
    coords = np.linspace(-1, 1, image_size, dtype=np.float32)
    light = 1 + np.float32(light_strength) * (
        np.float32(math.cos(light_dir)) * coords[None, :] + np.float32(math.sin(light_dir)) * coords[:, None]
    )
    img *= light[:, :, None]
    img *= np.float32(contrast)
    img += (128 * (1 - contrast) + brightness + cast).astype(np.float32)
    if blur_sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), blur_sigma * out_scale)
    # Sensor noise: a window of a fixed noise bank at a per-image offset (drawing fresh normals costs more than the
    # whole drawing pass).
    bank = _noise_bank(image_size)
    oy, ox = noise_offset % image_size, (noise_offset // image_size) % image_size
    img += bank[oy : oy + image_size, ox : ox + image_size] * np.float32(noise_sigma)
    return np.clip(img, 0, 255).astype(np.uint8)


_NOISE_BANKS: dict[int, np.ndarray] = {}


def _noise_bank(image_size: int) -> np.ndarray:
    """Standard-normal float32 noise ``(2*size, 2*size, 3)`` from a fixed seed, built once per image size."""
    bank = _NOISE_BANKS.get(image_size)
    if bank is None:
        bank = np.random.default_rng(0x5EED).standard_normal((2 * image_size, 2 * image_size, 3), dtype=np.float32)
        _NOISE_BANKS[image_size] = bank
    return bank
