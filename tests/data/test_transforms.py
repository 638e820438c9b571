"""Augmentation presets and face occlusion: determinism, dtype/shape, flip rate, occlusion placement, pickling."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from facetrain.data.occlusion import (
    ARCFACE_TEMPLATE_112,
    FACE_PARTS,
    JITTER,
    FaceMaskOcclusion,
    FacePartErasing,
    draw_face_mask,
    erase_face_part,
    nose_line,
    part_box,
)
from facetrain.data.transforms import build_augment, list_augment_presets, write_augment_preview
from facetrain.errors import DataError

PRESETS = list_augment_presets()


def _faces(n: int, size: int = 112, seed: int = 0) -> list[np.ndarray]:
    """Random-textured images with an asymmetric left half so flips are detectable."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_presets_listed():
    assert {"none", "flip", "basic", "strong"} <= set(PRESETS)


def test_unknown_preset_suggests():
    with pytest.raises(DataError, match="did you mean 'strong'"):
        build_augment("strog")


@pytest.mark.parametrize("preset", PRESETS)
def test_uint8_shape_preserved_and_input_untouched(preset):
    aug = build_augment(preset, seed=0)
    for img in _faces(6):
        before = img.copy()
        out = aug(img)
        assert out.dtype == np.uint8 and out.shape == (112, 112, 3) and out.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(img, before)


@pytest.mark.parametrize("preset", PRESETS)
def test_resizes_to_image_size(preset):
    aug = build_augment(preset, image_size=64, seed=0)
    out = aug(_faces(1, size=112)[0])
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("preset", PRESETS)
def test_deterministic_by_seed(preset):
    imgs = _faces(8)
    aug_a, aug_b = build_augment(preset, seed=3), build_augment(preset, seed=3)
    a, b = [aug_a(x) for x in imgs], [aug_b(x) for x in imgs]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    # Per-call generator: same generator seed -> same output, whatever the augment's own seed.
    x0 = imgs[0]
    out1 = build_augment(preset, seed=1)(x0, rng=np.random.default_rng([7, 0, 5]))
    out2 = build_augment(preset, seed=2)(x0, rng=np.random.default_rng([7, 0, 5]))
    np.testing.assert_array_equal(out1, out2)


def test_different_seeds_differ_for_random_presets():
    imgs = _faces(8)
    for preset in ("flip", "strong"):
        aug0, aug1 = build_augment(preset, seed=0), build_augment(preset, seed=1)
        a, b = [aug0(x) for x in imgs], [aug1(x) for x in imgs]
        assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True)), preset


def test_none_is_identity_at_size():
    img = _faces(1)[0]
    np.testing.assert_array_equal(build_augment("none")(img), img)


def test_flip_preset_flips_half():
    aug = build_augment("flip", seed=123)
    img = _faces(1)[0]
    mirrored = img[:, ::-1]
    n, flipped = 2000, 0
    for _ in range(n):
        out = aug(img)
        if np.array_equal(out, mirrored):
            flipped += 1
        else:
            np.testing.assert_array_equal(out, img)  # either untouched or exactly mirrored
    # Binomial(2000, 0.5): sd = 22.4; 5 sd either side.
    assert abs(flipped - n / 2) < 5 * np.sqrt(n * 0.25), flipped


def test_strong_changes_images_keeps_112_uint8():
    aug = build_augment("strong", seed=0)
    imgs = _faces(40)
    outs = [aug(x) for x in imgs]
    assert all(o.shape == (112, 112, 3) and o.dtype == np.uint8 for o in outs)
    changed = sum(not np.array_equal(o, x) for o, x in zip(outs, imgs, strict=True))
    # P(no step fires) = 0.85*0.85*0.5*0.4*0.5*0.7*0.85*0.8*0.8 ~ 0.035 per image.
    assert changed >= 32, changed
    mean_abs = np.mean([np.abs(o.astype(int) - x.astype(int)).mean() for o, x in zip(outs, imgs, strict=True)])
    assert mean_abs > 5


def test_strong_mask_masks_more_often_than_strong():
    """Lower face painted (>= 40 % of the lower-face box changed, upper face intact) counts as a mask."""
    img = np.full((112, 112, 3), 128, np.uint8)
    counts = {}
    for preset in ("strong", "strong_mask"):
        aug = build_augment("none")
        aug.steps = build_augment(preset).steps[:1]  # just the face-mask step
        rng = np.random.default_rng(0)
        outs = [aug(img, rng=rng) for _ in range(300)]
        counts[preset] = sum((o[80:100, 40:72] != 128).any(-1).mean() > 0.4 for o in outs)
    assert 20 <= counts["strong"] <= 75 and 110 <= counts["strong_mask"] <= 190, counts


# -- occlusion ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["surgical", "cloth", "n95"])
@pytest.mark.parametrize("size", [112, 96])
def test_face_mask_only_below_nose_line(style, size):
    grey = np.full((size, size, 3), 97, np.uint8)
    line = nose_line(size)
    assert line == int(np.ceil(ARCFACE_TEMPLATE_112[2, 1] * size / 112))
    for seed in range(20):
        out = draw_face_mask(grey, np.random.default_rng(seed), style=style)
        changed = (out != grey).any(-1)
        assert not changed[:line].any(), f"seed {seed}: mask above the nose line"
        rows = np.nonzero(changed.any(1))[0]
        # It covers the mouth: both mouth corners and the area between them.
        mouth = ARCFACE_TEMPLATE_112[3:5] * size / 112
        for x, y in mouth:
            assert changed[int(round(y)), int(round(x))], f"seed {seed}: mouth corner not covered"
        assert rows.min() <= line + 0.2 * (mouth[0, 1] - ARCFACE_TEMPLATE_112[2, 1] * size / 112) + 1
        assert changed.mean() > 0.15


def test_face_mask_varies_colour_and_shape():
    grey = np.full((112, 112, 3), 97, np.uint8)
    outs = [draw_face_mask(grey, np.random.default_rng(s)) for s in range(12)]
    colours = {tuple(o[95, 56] // 16) for o in outs}
    areas = {int((o != grey).any(-1).sum()) for o in outs}
    assert len(colours) >= 4 and len(areas) >= 8


@pytest.mark.parametrize("part", FACE_PARTS)
def test_part_erasing_hits_named_region(part):
    grey = np.full((112, 112, 3), 128, np.uint8)
    x0, y0, x1, y1 = part_box(part, 112, 112)
    gx0, gy0 = x0 - JITTER * (x1 - x0), y0 - JITTER * (y1 - y0)
    gx1, gy1 = x1 + JITTER * (x1 - x0), y1 + JITTER * (y1 - y0)
    landmark_of = {"left_eye": [0], "right_eye": [1], "eyes": [0, 1], "nose": [2], "mouth": [3, 4]}
    for seed in range(25):
        out = erase_face_part(grey, part, np.random.default_rng(seed), fill=(255, 0, 0))
        rows, cols = np.nonzero((out != grey).any(-1))
        assert rows.size > 0
        assert rows.min() >= np.floor(gy0) and rows.max() < np.ceil(gy1)
        assert cols.min() >= np.floor(gx0) and cols.max() < np.ceil(gx1)
        for k in landmark_of[part]:
            x, y = ARCFACE_TEMPLATE_112[k]
            assert (out[int(y), int(x)] == (255, 0, 0)).all(), f"seed {seed}: landmark {k} not erased"


def test_part_boxes_layout():
    left, right, eyes = (part_box(p, 112, 112) for p in ("left_eye", "right_eye", "eyes"))
    nose, mouth = part_box("nose", 112, 112), part_box("mouth", 112, 112)
    assert eyes[0] <= left[0] and eyes[2] >= right[2] and eyes[1] <= min(left[1], right[1])
    assert left[2] < right[0]  # the two eye boxes are apart
    assert nose[3] < mouth[1]  # nose above mouth
    # Boxes scale with the image.
    np.testing.assert_allclose(part_box("mouth", 224, 224), np.array(mouth) * 2)


def test_occlusion_rejects_bad_input():
    with pytest.raises(DataError, match="uint8 HxWx3"):
        draw_face_mask(np.zeros((112, 112), np.uint8), np.random.default_rng(0))
    with pytest.raises(DataError, match="unknown face part"):
        FacePartErasing(parts=["ear"])
    with pytest.raises(DataError, match="uint8 HxWx3"):
        build_augment("flip")(np.zeros((112, 112, 3), np.float32))


def test_occlusion_probability():
    grey = np.full((112, 112, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    for op in (FaceMaskOcclusion(p=0.3), FacePartErasing(p=0.3, fill=(0, 0, 0))):
        hits = sum(not np.array_equal(op(grey, rng), grey) for _ in range(1000))
        assert abs(hits - 300) < 5 * np.sqrt(1000 * 0.21), (op, hits)


# -- workers, pickling, laziness ---------------------------------------------------------------------------------


class _ImageSet(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 3


@pytest.mark.parametrize("preset", PRESETS)
def test_picklable_and_works_in_dataloader_with_2_workers(preset):
    from facetrain.data.loader import TrainTransformDataset

    aug = build_augment(preset, seed=0)
    aug(_faces(1)[0])  # builds the lazy albumentations pipeline; pickling must still work
    clone = pickle.loads(pickle.dumps(aug))
    img = _faces(1)[0]
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    np.testing.assert_array_equal(aug(img, rng=rng_a), clone(img, rng=rng_b))
    ds = TrainTransformDataset(_ImageSet(_faces(8)), aug, seed=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    assert images.shape == (8, 3, 112, 112) and images.dtype == torch.uint8
    # Same as in-process: per-sample augmentation does not depend on the worker.
    expected = torch.stack([ds[i][0] for i in range(8)])
    assert torch.equal(images, expected)


def test_none_and_flip_do_not_import_albumentations():
    code = (
        "import sys, numpy as np\n"
        "from facetrain.data.transforms import build_augment\n"
        "for p in ('none', 'flip'):\n"
        "    build_augment(p, seed=0)(np.zeros((112, 112, 3), np.uint8))\n"
        "assert 'albumentations' not in sys.modules, 'albumentations imported'\n"
        "build_augment('basic', seed=0)\n"
        "assert 'albumentations' not in sys.modules, 'imported at build time'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_write_augment_preview(tmp_path):
    import cv2

    from facetrain.data.recordio import write_rec_dataset

    samples = [(cv2.imencode(".png", x)[1].tobytes(), i % 2) for i, x in enumerate(_faces(6, size=112))]
    write_rec_dataset(tmp_path / "rec", samples)
    out = write_augment_preview(tmp_path / "rec", tmp_path / "g.png", preset="strong", n=10, columns=4, seed=1)
    grid = cv2.imread(str(out))
    assert grid.shape == (3 * 114 - 2, 4 * 114 - 2, 3)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
