"""Augmentation presets for aligned faces (uint8 RGB in, uint8 RGB out), behind a small adapter.

``build_augment(preset)`` returns a picklable callable for DataLoader workers. Presets:

======== ========================================================================================================
none     resize to ``image_size`` if needed (no randomness)
flip     horizontal flip with p=0.5 (aligned faces are near-symmetric: the template mirrors onto itself)
basic    flip, small affine (scale 0.9-1.1, shift 4 %, rotate 8 deg, p=0.5), brightness/contrast (p=0.5)
strong   face pipeline: occlusion first, in template coordinates (face mask p=0.15 | part erasing p=0.15), flip,
         affine (scale 0.9-1.1, shift 6 %, rotate 10 deg, p=0.6), brightness/contrast (p=0.5), hue/saturation
         (p=0.3), CLAHE (p=0.15), Gaussian noise (p=0.2), coarse dropout (1-3 holes, p=0.2), resize to image_size
strong_mask  as strong with face masks at p=0.5 (for masked-face recognition)
======== ========================================================================================================

Only ``none`` and ``flip`` run without albumentations; the others import albumentations 2.x lazily, inside
:class:`AlbumentationsStep` (the adapter: a list of ``(transform name, kwargs)`` specs, rebuilt in each worker), so the
library can be swapped by replacing that one class.

Randomness: ``augment(image)`` draws from the augment's own generator (seeded by ``seed``);
``augment(image, rng=generator)`` draws only from ``generator``, which the training loader derives from
``(seed, epoch, index)`` so augmentation is reproducible across workers and resumes.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facetrain.data.occlusion import FaceMaskOcclusion, FacePartErasing
from facetrain.errors import DataError, DependencyError, closest
from facetrain.fileio import atomic_write_bytes

__all__ = [
    "Augment",
    "AlbumentationsStep",
    "HorizontalFlip",
    "Resize",
    "build_augment",
    "list_augment_presets",
    "write_augment_preview",
]

log = logging.getLogger(__name__)

Step = Callable[[np.ndarray, np.random.Generator], np.ndarray]

_PRESETS = ("none", "flip", "basic", "strong", "strong_mask")


def list_augment_presets() -> list[str]:
    """Names accepted by :func:`build_augment`."""
    return list(_PRESETS)


def build_augment(preset: str, *, image_size: int = 112, seed: int | None = None) -> Augment:
    """Build an augmentation preset (see the module docstring for what each does).

    Args:
        preset: one of :func:`list_augment_presets`.
        image_size: output side in pixels (square).
        seed: seed of the augment's own generator (None: fresh OS entropy).

    Returns:
        a picklable :class:`Augment`:
        ``augment(uint8 HxWx3 RGB[, rng=Generator]) -> uint8 (image_size, image_size, 3)``.

    Raises:
        DataError: unknown preset or bad image_size.
    """
    if preset not in _PRESETS:
        hint = closest(preset, _PRESETS)
        raise DataError(
            f"unknown augmentation preset {preset!r}{f' (did you mean {hint!r}?)' if hint else ''}; "
            f"choose one of {', '.join(_PRESETS)}"
        )
    if int(image_size) < 8:
        raise DataError(f"augmentation image_size must be >= 8, got {image_size}")
    size = int(image_size)
    steps: list[Step] = []
    if preset == "flip":
        steps = [HorizontalFlip(0.5)]
    elif preset == "basic":
        steps = [
            HorizontalFlip(0.5),
            AlbumentationsStep(
                [
                    ("Affine", dict(scale=(0.9, 1.1), translate_percent=(-0.04, 0.04), rotate=(-8, 8), p=0.5)),
                    ("RandomBrightnessContrast", dict(brightness_limit=0.2, contrast_limit=0.2, p=0.5)),
                ]
            ),
        ]
    elif preset in ("strong", "strong_mask"):
        mask_p = 0.5 if preset == "strong_mask" else 0.15
        steps = [
            FaceMaskOcclusion(p=mask_p),
            FacePartErasing(p=0.15),
            HorizontalFlip(0.5),
            AlbumentationsStep(
                [
                    ("Affine", dict(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-10, 10), p=0.6)),
                    ("RandomBrightnessContrast", dict(brightness_limit=0.25, contrast_limit=0.25, p=0.5)),
                    ("HueSaturationValue", dict(hue_shift_limit=8, sat_shift_limit=20, val_shift_limit=10, p=0.3)),
                    ("CLAHE", dict(clip_limit=(1.0, 3.0), tile_grid_size=(8, 8), p=0.15)),
                    ("GaussNoise", dict(std_range=(0.02, 0.08), p=0.2)),
                    (
                        "CoarseDropout",
                        dict(
                            num_holes_range=(1, 3),
                            hole_height_range=(0.08, 0.2),
                            hole_width_range=(0.08, 0.2),
                            fill="random_uniform",
                            p=0.2,
                        ),
                    ),
                ]
            ),
        ]
    steps.append(Resize(size))
    return Augment(preset, steps, seed=seed)


class Augment:
    """A sequence of augmentation steps with its own seeded generator; picklable.

    Args:
        name: preset name (for repr/logging).
        steps: callables ``step(image, rng) -> image`` applied in order.
        seed: seed of the generator used when no ``rng`` is passed.
    """

    accepts_rng = True  # TrainTransformDataset passes a per-sample generator

    def __init__(self, name: str, steps: Sequence[Step], *, seed: int | None = None) -> None:
        self.name, self.steps, self.seed = name, list(steps), seed
        self._rng = np.random.default_rng(seed)

    @property
    def is_random(self) -> bool:
        """Whether any step draws random numbers (False for ``none``: callers may skip making a generator)."""
        return any(not isinstance(step, Resize) for step in self.steps)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Augment one image.

        Args:
            image: (H, W, 3) uint8 RGB.
            rng: generator to draw from (default: the augment's own).

        Returns:
            (image_size, image_size, 3) uint8 RGB, C-contiguous; the input is never modified.
        """
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise DataError(f"augment {self.name!r} expects a uint8 HxWx3 RGB image, got {got}")
        rng = self._rng if rng is None else rng
        for step in self.steps:
            image = step(image, rng)
        return np.ascontiguousarray(image)

    def __repr__(self) -> str:
        return f"Augment({self.name!r}, steps={self.steps!r})"


class HorizontalFlip:
    """Mirror left-right with probability ``p`` (one uniform draw per image)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return image[:, ::-1] if rng.random() < self.p else image

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"


class Resize:
    """Resize to ``size`` x ``size`` (area when shrinking, linear when growing); a no-op at the right size."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]
        if h == self.size and w == self.size:
            return image
        interp = cv2.INTER_AREA if h > self.size or w > self.size else cv2.INTER_LINEAR
        return cv2.resize(np.ascontiguousarray(image), (self.size, self.size), interpolation=interp)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class AlbumentationsStep:
    """Adapter: run an albumentations 2.x pipeline, seeded per image from our generator.

    Holds only ``(transform name, kwargs)`` specs; the ``albumentations.Compose`` is built lazily on first use (so
    pickling to workers ships specs, not library objects). Each transform gets its own seed drawn from ``rng`` per
    image, so the transforms' random decisions are independent and reproducible.

    Args:
        specs: ``[(name, kwargs), ...]`` with albumentations 2.x names and arguments (e.g. ``Affine``,
            ``CoarseDropout(num_holes_range=..., hole_height_range=...)``).
    """

    def __init__(self, specs: Sequence[tuple[str, dict[str, Any]]]) -> None:
        self.specs = [(str(name), dict(kwargs)) for name, kwargs in specs]
        self._compose = None

    def __getstate__(self) -> dict[str, Any]:
        return {"specs": self.specs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.specs, self._compose = state["specs"], None

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        compose = self._compose if self._compose is not None else self._build()
        seed = int(rng.integers(0, 2**63))
        # One numpy and one python stream per image, shared by the transforms (their draws are sequential, hence
        # independent): 2 generator constructions per image instead of 2 per transform with set_random_seed.
        numpy_stream, python_stream = np.random.Generator(np.random.PCG64(seed)), random.Random(seed)
        for transform in compose.transforms:
            if hasattr(transform, "random_generator") and hasattr(transform, "py_random"):  # albumentations 2.0.x
                transform.random_generator, transform.py_random = numpy_stream, python_stream
            else:
                transform.set_random_seed(int(numpy_stream.integers(0, 2**32)))
        return compose(image=np.ascontiguousarray(image))["image"]

    def _build(self):
        try:
            import albumentations
        except Exception as exc:  # missing, or a broken install raising anything at import
            raise DependencyError(
                f"augmentation presets basic/strong need albumentations 2.0.x ({type(exc).__name__}: {exc}); "
                "install it with: pip install albumentations==2.0.8"
            ) from exc
        transforms = []
        for name, kwargs in self.specs:
            cls = getattr(albumentations, name, None)
            if cls is None:
                raise DataError(
                    f"albumentations {albumentations.__version__} has no transform {name!r}; facetrain needs 2.0.x"
                )
            transforms.append(cls(**kwargs))
        self._compose = albumentations.Compose(transforms, seed=0)
        return self._compose

    def __repr__(self) -> str:
        return f"AlbumentationsStep({[name for name, _ in self.specs]})"


def write_augment_preview(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    preset: str = "strong",
    n: int = 32,
    seed: int = 0,
    columns: int = 8,
    image_size: int = 112,
) -> Path:
    """Write a PNG grid of ``n`` augmented samples of the dataset at ``data`` (atomically).

    Samples are ``n`` random dataset indices (seeded), each augmented once with ``preset``; tiles are laid out
    ``columns`` per row with a 2-pixel gap.

    Args:
        data: anything :func:`facetrain.data.open_dataset` opens.
        out: output .png path.
        preset: augmentation preset.
        n: number of tiles (>= 1).
        seed: seeds the sample choice and the augmentation.
        columns: tiles per row.
        image_size: tile side.

    Returns:
        the written path.
    """
    from facetrain.data import open_dataset

    if n < 1 or columns < 1:
        raise DataError(f"preview needs n >= 1 and columns >= 1, got n={n}, columns={columns}")
    augment = build_augment(preset, image_size=image_size, seed=seed)
    dataset = open_dataset(data)
    if len(dataset) == 0:
        raise DataError(f"{data}: the dataset is empty; nothing to preview")
    rng = np.random.default_rng(seed)
    indices = rng.choice(len(dataset), size=n, replace=n > len(dataset))
    tiles = [augment(np.asarray(dataset[int(i)][0])) for i in indices]
    gap, cols = 2, min(columns, n)
    rows = -(-n // cols)
    grid = np.full((rows * (image_size + gap) - gap, cols * (image_size + gap) - gap, 3), 255, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        grid[r * (image_size + gap) : r * (image_size + gap) + image_size,
             c * (image_size + gap) : c * (image_size + gap) + image_size] = tile  # fmt: skip
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise DataError(f"{out}: could not encode the preview PNG")
    out = atomic_write_bytes(out, encoded.tobytes())
    log.debug("wrote %d %s samples to %s", n, preset, out)
    return out
