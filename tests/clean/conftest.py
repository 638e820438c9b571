"""Shared fixtures of the data-quality tests: a small synthetic dataset with injected label noise and corrupted
images written as RecordIO, and a tiny demo_cnn trained on it with Sub-center ArcFace (K=3), saved as a training
checkpoint in the contract format (``class_centres`` (C*K, D), ``subcenter_k``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facetrain.data.images import encode_image
from facetrain.data.recordio import write_rec_dataset
from facetrain.data.synthetic import SyntheticIdentities

NUM_IDS = 16
PER_ID = 12
SUBCENTER_K = 3


def corrupt(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A badly degraded face: heavy blur plus strong noise (what a quality score should flag)."""
    out = cv2.GaussianBlur(image, (0, 0), 6.0).astype(np.float32)
    out += rng.normal(0, 60, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


DEGRADATIONS = ("blur_noise", "low_resolution", "occlusion")


def degrade(image: np.ndarray, rng: np.random.Generator, kind: str) -> np.ndarray:
    """One of the realistic degradations of held-out faces: heavy blur + noise (:func:`corrupt`), low resolution
    (8..12 px side, upscaled, plus sensor noise) or a large occluder over 60x82 px of the face."""
    if kind == "blur_noise":
        return corrupt(image, rng)
    if kind == "low_resolution":
        side = int(rng.integers(8, 13))
        small = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
        out = cv2.resize(small, image.shape[1::-1], interpolation=cv2.INTER_LINEAR).astype(np.float32)
        out += rng.normal(0, 20, out.shape)
        return np.clip(out, 0, 255).astype(np.uint8)
    if kind == "occlusion":
        out = image.copy()
        y0, x0 = int(rng.integers(20, 50)), int(rng.integers(0, 30))
        out[y0 : y0 + 60, x0 : x0 + 82] = rng.integers(0, 255, 3, dtype=np.uint8)
        return out
    raise ValueError(f"unknown degradation {kind!r}")


@dataclass
class NoisyData:
    path: Path
    images: np.ndarray  # (N, 112, 112, 3) uint8 as stored
    labels: np.ndarray  # (N,) stored (possibly wrong) labels
    true_labels: np.ndarray  # (N,) identity actually shown
    mislabeled: np.ndarray  # (N,) bool
    corrupted: np.ndarray  # (N,) bool


@pytest.fixture(scope="session")
def noisy_data(tmp_path_factory) -> NoisyData:
    rng = np.random.default_rng(7)
    synth = SyntheticIdentities(NUM_IDS, PER_ID, seed=11)
    images = np.stack([synth[i][0] for i in range(len(synth))])
    true = synth.labels().copy()
    labels = true.copy()
    mislabeled = rng.random(len(labels)) < 0.10
    labels[mislabeled] = (true[mislabeled] + rng.integers(1, NUM_IDS, mislabeled.sum())) % NUM_IDS
    corrupted = (~mislabeled) & (rng.random(len(labels)) < 0.10)
    for i in np.flatnonzero(corrupted):
        images[i] = corrupt(images[i], rng)
    path = tmp_path_factory.mktemp("clean") / "noisy"
    write_rec_dataset(
        path, ((encode_image(img, ext=".png"), int(lab)) for img, lab in zip(images, labels)), num_classes=NUM_IDS
    )
    return NoisyData(path, images, labels, true, mislabeled, corrupted)


def train_subcenter_model(
    images: np.ndarray, labels: np.ndarray, *, steps: int = 120, seed: int = 0, num_classes: int = NUM_IDS
):
    """A few dozen SGD steps of demo_cnn + Sub-center ArcFace; returns (backbone, class_centres (C*K, D))."""
    from facetrain.heads import build_margin
    from facetrain.models import build_backbone

    torch.manual_seed(seed)
    model = build_backbone("demo_cnn", embedding_size=64, width=8)
    centres = torch.nn.Parameter(torch.randn(num_classes * SUBCENTER_K, 64) * 0.01)
    margin = build_margin("arcface", subcenter_k=SUBCENTER_K, scale=16.0, angular_margin=0.2)
    opt = torch.optim.SGD([*model.parameters(), centres], lr=0.1, momentum=0.9, weight_decay=5e-4)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float().sub(127.5).div(127.5)
    y_all = torch.from_numpy(labels).long()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (48,), generator=gen)
        x = x_all[idx]
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, x, x.flip(3))
        emb = torch.nn.functional.normalize(model(x))
        cos = emb @ torch.nn.functional.normalize(centres).T
        loss = torch.nn.functional.cross_entropy(margin(cos.clamp(-1, 1), y_all[idx]).logits, y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), centres.detach()


@pytest.fixture(scope="session")
def trained_checkpoint(noisy_data, tmp_path_factory) -> Path:
    # The corrupted images are left out of training (a tiny model would memorize them); they stay in the dataset, so
    # their cosine to the class centre (the quality target) is honestly low.
    seen = ~noisy_data.corrupted
    model, centres = train_subcenter_model(noisy_data.images[seen], noisy_data.labels[seen])
    path = tmp_path_factory.mktemp("ckpt") / "subcenter.pt"
    torch.save(
        {
            "format": "facetrain.checkpoint/1",
            "step": 120,
            "backbone_name": "demo_cnn",
            "backbone_kwargs": {"width": 8},
            "embedding_size": 64,
            "num_classes": NUM_IDS,
            "subcenter_k": SUBCENTER_K,
            "backbone": model.state_dict(),
            "class_centres": centres,
            "config": {},
        },
        path,
    )
    return path


QUALITY_IDS = 32
QUALITY_PER_ID = 10
QUALITY_STEPS = 300
QUALITY_FIT_PER_ID = 30
QUALITY_FIT_DEGRADED = 0.5


@dataclass
class QualitySetup:
    checkpoint: Path  # demo_cnn trained on the clean images of ``train_data``
    train_data: Path  # QUALITY_IDS x QUALITY_PER_ID images, 20% degraded (left out of backbone training)
    fit_data: Path  # QUALITY_IDS x QUALITY_FIT_PER_ID other images of the same identities, never trained on


def make_quality_checkpoint(root: Path, seed: int) -> QualitySetup:
    """A stronger model for the held-out quality claim, and a dataset to fit the quality regressor on.

    Backbone: 32 identities x 10 images, 20% of them degraded (mixed :data:`DEGRADATIONS`), 300 SGD steps on the clean
    ones (about 30 s on one thread). Fit set: 30 further renderings of each of the same 32 identities (960 images,
    labels index the checkpoint's classes), half of them degraded like the held-out images. The backbone never saw
    them, so their cosine to the class centre measures how well it embeds them; on the images it trained on that
    cosine is close to its memorized maximum whatever their quality. Writes everything under ``root``.
    """
    rng = np.random.default_rng(seed)
    per_id = QUALITY_PER_ID + QUALITY_FIT_PER_ID
    synth = SyntheticIdentities(QUALITY_IDS, per_id, seed=11 + seed)
    images = np.stack([synth[i][0] for i in range(len(synth))])
    labels = synth.labels()
    in_train = np.arange(len(labels)) % per_id < QUALITY_PER_ID
    bad = rng.random(len(labels)) < np.where(in_train, 0.2, QUALITY_FIT_DEGRADED)
    kinds = rng.integers(0, len(DEGRADATIONS), len(labels))
    for i in np.flatnonzero(bad):
        images[i] = degrade(images[i], rng, DEGRADATIONS[kinds[i]])
    for name, part in (("data", in_train), ("fit", ~in_train)):
        write_rec_dataset(
            root / name,
            ((encode_image(img, ext=".png"), int(lab)) for img, lab in zip(images[part], labels[part])),
            num_classes=QUALITY_IDS,
        )
    seen = in_train & ~bad
    model, centres = train_subcenter_model(
        images[seen], labels[seen], steps=QUALITY_STEPS, seed=seed, num_classes=QUALITY_IDS
    )
    torch.save(
        {
            "format": "facetrain.checkpoint/1",
            "step": QUALITY_STEPS,
            "backbone_name": "demo_cnn",
            "backbone_kwargs": {"width": 8},
            "embedding_size": 64,
            "num_classes": QUALITY_IDS,
            "subcenter_k": SUBCENTER_K,
            "backbone": model.state_dict(),
            "class_centres": centres,
            "config": {},
        },
        root / "model.pt",
    )
    return QualitySetup(root / "model.pt", root / "data", root / "fit")
