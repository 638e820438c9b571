"""Check an exported ONNX model: parity with PyTorch, and the ICCV21 masked-face-recognition (MFR) constraints.

Parity runs the PyTorch module and onnxruntime on the same aligned faces and reports the max absolute difference and
the min cosine similarity of the raw embeddings (and, given a ``.bin``, the 10-fold accuracy of both).

The MFR challenge (insightface ``challenges/iccv21-mfr``; checked by arcface_torch's ``onnx_helper.py``) accepted an
ONNX model only if: it loads in onnxruntime; its input is 4-D with a symbolic batch dimension (batch inference) and
112x112; it has exactly one output and at least 8 nodes; the file is at most 1024 MB; every weight is at least 32-bit
(no fp16/int8); the feature dimension is at most 512; and one 112x112 image runs in at most 15 ms (the 6th fastest of
50 runs, measured on the organizers' GPU, so a CPU figure here is indicative only). We add: a batch gives finite
(NaN/Inf-free) outputs.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from facetrain.errors import DataError, ModelError, require
from facetrain.export.onnx import inspect_onnx

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["Constraint", "ParityReport", "check_mfr", "check_parity", "load_faces", "random_faces"]

MFR_MAX_SIZE_MB = 1024.0
MFR_MAX_FEATURE_DIM = 512
MFR_MAX_LATENCY_MS = 15.0
MFR_INPUT_SIZE = (112, 112)
MFR_MIN_NODES = 8


@dataclass
class ParityReport:
    """PyTorch vs onnxruntime on the same faces.

    Attributes:
        n_images: faces compared.
        faces: where the faces came from.
        max_abs_diff: max |torch - onnx| over all embedding entries.
        max_rel_diff: ``max_abs_diff / max |torch|`` (random-init deep models give huge raw values).
        min_cosine: smallest cosine similarity between the two embeddings of a face.
        mean_cosine: mean of those cosines.
        torch_accuracy: 10-fold verification accuracy of the PyTorch model on ``bin_path`` (None without one).
        onnx_accuracy: the same for the ONNX model.
        bin_path: the ``.bin`` used, if any.
    """

    n_images: int
    faces: str
    max_abs_diff: float
    min_cosine: float
    mean_cosine: float
    max_rel_diff: float = 0.0
    torch_accuracy: float | None = None
    onnx_accuracy: float | None = None
    bin_path: str | None = None

    def passed(self, min_cosine: float = 0.9999) -> bool:
        """Every face's two embeddings agree to ``min_cosine``."""
        return self.min_cosine >= min_cosine


@dataclass
class Constraint:
    """One MFR challenge rule: ``passed`` with the measured ``value`` against ``limit``."""

    name: str
    passed: bool
    value: str
    limit: str


def check_parity(
    torch_model: nn.Module,
    onnx_path: str | os.PathLike,
    images: np.ndarray,
    *,
    faces: str = "given",
    bin_path: str | os.PathLike | None = None,
    batch_size: int = 32,
) -> ParityReport:
    """Compare the raw embeddings of a PyTorch backbone and its ONNX export.

    Args:
        torch_model: the backbone (eager or TorchScript), taking (B, 3, 112, 112) normalized RGB.
        onnx_path: the exported model.
        images: (N, 112, 112, 3) uint8 RGB aligned faces.
        faces: description of ``images`` for the report.
        bin_path: optional verification ``.bin``: both models are evaluated on it (flip test, 10 folds).
        batch_size: images per run.

    Returns:
        :class:`ParityReport`.
    """
    from facetrain.embed import OnnxEmbedder, TorchEmbedder

    torch_embedder = TorchEmbedder(torch_model, device="cpu", batch_size=batch_size, name="pytorch")
    onnx_embedder = OnnxEmbedder(onnx_path, batch_size=batch_size, providers=["CPUExecutionProvider"])
    a = torch_embedder.embed(images).astype(np.float64)
    b = onnx_embedder.embed(images).astype(np.float64)
    if a.shape != b.shape:
        raise ModelError(f"{onnx_path}: ONNX embeddings have shape {b.shape}, PyTorch ones {a.shape}")
    if not np.isfinite(a).all():
        raise ModelError(
            "the PyTorch model itself gives NaN/Inf embeddings on these faces (untrained or diverged weights); "
            "parity cannot be measured"
        )
    cos = np.einsum("ij,ij->i", a, b) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    report = ParityReport(
        n_images=int(a.shape[0]),
        faces=faces,
        max_abs_diff=float(np.max(np.abs(a - b))) if a.size else 0.0,
        min_cosine=float(cos.min()) if cos.size else 1.0,
        mean_cosine=float(cos.mean()) if cos.size else 1.0,
        max_rel_diff=float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30)) if a.size else 0.0,
    )
    if bin_path is not None:
        from facetrain.eval.verification import verify_bin

        report.bin_path = str(bin_path)
        report.torch_accuracy = verify_bin(torch_embedder, bin_path).accuracy_mean
        report.onnx_accuracy = verify_bin(onnx_embedder, bin_path).accuracy_mean
    return report


def check_mfr(
    onnx_path: str | os.PathLike,
    *,
    max_latency_ms: float = MFR_MAX_LATENCY_MS,
    runs: int = 50,
    image: np.ndarray | None = None,
) -> list[Constraint]:
    """Check the ICCV21-MFR submission rules (module docstring) and return one :class:`Constraint` per rule.

    Args:
        onnx_path: the model.
        max_latency_ms: the latency limit (15 ms on the organizers' GPU).
        runs: single-image timing runs; the 6th fastest (or the fastest if fewer) is reported, like the organizers.
        image: optional (112, 112, 3) uint8 RGB face for the timing run (default: random pixels).
    """
    ort = require("onnxruntime", "onnx", "the MFR check")
    info = inspect_onnx(onnx_path)
    rules: list[Constraint] = []
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        loaded = True
    except Exception as exc:  # onnxruntime's own exception types
        session, loaded = None, False
        logger.warning("onnxruntime cannot load %s: %s", onnx_path, exc)
    rules.append(Constraint("loads in onnxruntime", loaded, "yes" if loaded else "no", "yes"))
    shape = info.input_shape
    rules.append(Constraint("input is 4-D", len(shape) == 4, str(shape), "(batch, 3, 112, 112)"))
    rules.append(Constraint("symbolic batch dimension", info.dynamic_batch, str(shape[:1]), "a name, not a number"))
    hw = tuple(shape[2:4]) if len(shape) == 4 else ()
    rules.append(Constraint("input size 112x112", hw == MFR_INPUT_SIZE, "x".join(map(str, hw)) or "-", "112x112"))
    rules.append(Constraint("exactly one output", info.n_outputs == 1, str(info.n_outputs), "1"))
    rules.append(Constraint("graph has >= 8 nodes", info.n_nodes >= MFR_MIN_NODES, str(info.n_nodes), ">= 8"))
    size_mb = info.size_bytes / 2**20
    rules.append(Constraint("file size", size_mb <= MFR_MAX_SIZE_MB, f"{size_mb:.1f} MB", f"<= {MFR_MAX_SIZE_MB:g} MB"))
    narrow = [d for d in info.initializer_dtypes if np.dtype(d).itemsize < 4]
    rules.append(
        Constraint("fp32 weights (no fp16/int8)", not narrow, ",".join(info.initializer_dtypes) or "-", ">= 32-bit")
    )
    if session is None:
        for name in ("feature dim", "single-image latency", "finite batch outputs"):
            rules.append(Constraint(name, False, "not run", "model must load"))
        return rules

    input_name = session.get_inputs()[0].name
    h, w = hw if len(hw) == 2 and all(isinstance(d, int) for d in hw) else MFR_INPUT_SIZE
    if image is None:
        image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    blob = _normalize(image[None])
    timings = []
    out = None
    for _ in range(max(int(runs), 1)):
        start = time.perf_counter()
        out = session.run(None, {input_name: blob})[0]
        timings.append((time.perf_counter() - start) * 1000.0)
    timings.sort()
    latency = timings[min(5, len(timings) - 1)]
    dim = int(np.asarray(out).reshape(1, -1).shape[1])
    rules.append(Constraint("feature dim", dim <= MFR_MAX_FEATURE_DIM, str(dim), f"<= {MFR_MAX_FEATURE_DIM}"))
    rules.append(
        Constraint(
            "single-image latency (CPU here; GPU upstream)",
            latency <= max_latency_ms,
            f"{latency:.2f} ms",
            f"<= {max_latency_ms:g} ms",
        )
    )
    batch = _stress_batch(h, w)
    try:
        outputs = session.run(None, {input_name: _normalize(batch)})[0]
        finite = bool(np.isfinite(outputs).all()) and outputs.shape[0] == batch.shape[0]
        value = f"{outputs.shape[0]} rows, finite={bool(np.isfinite(outputs).all())}"
    except Exception as exc:  # a fixed batch dimension makes this fail: report it as a failed rule
        finite, value = False, f"batch of {batch.shape[0]} failed: {str(exc).splitlines()[0][:80]}"
    rules.append(Constraint("finite batch outputs", finite, value, "no NaN/Inf"))
    return rules


def load_faces(
    data: str | os.PathLike | None = None, *, bin_path: str | os.PathLike | None = None, limit: int = 64
) -> tuple[np.ndarray, str]:
    """Aligned faces to compare models on: from a dataset/folder, else from a ``.bin``, else random pixels.

    Args:
        data: an aligned dataset (image folder ``root/<id>/<img>``, flat folder of images, ``.rec`` or list file);
            ``limit`` faces evenly spread over it are read.
        bin_path: a verification ``.bin`` (its first ``limit`` images are used when ``data`` is None).
        limit: at most this many faces.

    Returns:
        ``((N, 112, 112, 3) uint8 RGB, description)``.

    Raises:
        DataError: a face is not 112x112, or the source holds no image.
    """
    if data is not None:
        from facetrain.embed_batch import open_input

        source = open_input(data)
        # Evenly spread over the dataset (calibration should see every identity, not the first folder only).
        picks = np.unique(np.linspace(0, len(source) - 1, min(limit, len(source))).round().astype(int))
        images = [source.load(int(index))[0] for index in picks]
        if not images:
            raise DataError(f"{data}: no images to check the model on")
        faces = np.stack(_checked_112(images, str(data)))
        return faces, f"{len(faces)} faces from {data}"
    if bin_path is not None:
        from facetrain.data import read_bin

        images, _ = read_bin(bin_path)
        faces = np.stack(_checked_112(images[:limit], str(bin_path)))
        return faces, f"{len(faces)} faces from {bin_path}"
    return random_faces(limit), f"{limit} random faces"


def random_faces(n: int, *, seed: int = 0) -> np.ndarray:
    """(n, 112, 112, 3) uint8: smooth random images (blurred noise with a face-like brightness range)."""
    import cv2

    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
    return np.stack([cv2.resize(x, (112, 112), interpolation=cv2.INTER_CUBIC) for x in noise])


def _checked_112(images: list[np.ndarray], where: str) -> list[np.ndarray]:
    for image in images:
        if image.shape[:2] != (112, 112):
            raise DataError(f"{where}: face of size {image.shape[1]}x{image.shape[0]}, expected aligned 112x112")
    return images


def _normalize(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32 ``(x - 127.5) / 127.5``."""
    return np.ascontiguousarray((images.astype(np.float32).transpose(0, 3, 1, 2) - 127.5) / 127.5)


def _stress_batch(h: int, w: int) -> np.ndarray:
    """A batch of 32 with the extremes (all black, all white) and random faces."""
    batch = np.concatenate(
        [np.zeros((1, h, w, 3), np.uint8), np.full((1, h, w, 3), 255, np.uint8), random_faces(30, seed=1)]
    )
    if (h, w) != (112, 112):
        import cv2

        batch = np.stack([cv2.resize(x, (w, h)) for x in batch])
    return batch
