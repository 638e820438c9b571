"""Embedders: anything that maps aligned 112x112 RGB faces to raw embeddings (torch module, TorchScript, ONNX).

Evaluation, export checks, cleaning and the people library take an :class:`Embedder`, never a training object.
Every embedder takes ``(B, H, W, 3)`` uint8 RGB (112x112 for the standard models), normalizes it the way
arcface_torch does, ``(x / 255 - 0.5) / 0.5`` = ``(x - 127.5) / 127.5``, runs the model in batches of
``batch_size`` and returns ``(B, D)`` float32 **unnormalized** embeddings.

``identity`` is a short hash of the weights (not of the file name), so a library of embeddings can tell whether two
runs used the same model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from facetrain.errors import DataError, ModelError, require

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["Embedder", "BaseEmbedder", "TorchEmbedder", "OnnxEmbedder", "load_embedder", "iter_batches"]


@runtime_checkable
class Embedder(Protocol):
    """What evaluation and the people library need from a model."""

    name: str
    embedding_size: int

    @property
    def identity(self) -> str: ...

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB -> (B, D) float32 raw embeddings."""
        ...

    def embed_flip(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of the images and of their horizontal flips, each (B, D) float32."""
        ...


class BaseEmbedder:
    """Batching, input checks and the flip helper; subclasses implement ``_embed_batch``.

    Attributes:
        name: a readable name (file stem or module class).
        embedding_size: D.
        batch_size: images per forward call.
        input_size: (H, W) the model expects, or None if any size is accepted.
    """

    name: str = "embedder"
    embedding_size: int = 0
    batch_size: int = 64
    input_size: tuple[int, int] | None = (112, 112)

    @property
    def identity(self) -> str:
        """16 hex digits of a SHA-256 over the weights."""
        raise NotImplementedError

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embed aligned faces.

        Args:
            images: (B, H, W, 3) uint8 RGB (one (H, W, 3) image is accepted too).

        Returns:
            (B, D) float32 raw (unnormalized) embeddings.
        """
        images = self._check(images)
        if images.shape[0] == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        out = [self._embed_batch(batch) for batch in iter_batches(images, self.batch_size)]
        return np.concatenate(out).astype(np.float32, copy=False)

    def embed_flip(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of the images and of their horizontal flips (the flip test), each (B, D) float32."""
        images = self._check(images)
        return self.embed(images), self.embed(np.ascontiguousarray(images[:, :, ::-1]))

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{self.name}: expected aligned faces as (B, H, W, 3) uint8 RGB, got shape {images.shape} "
                f"dtype {images.dtype}"
            )
        if self.input_size is not None and tuple(images.shape[1:3]) != tuple(self.input_size):
            raise DataError(
                f"{self.name}: model input is {self.input_size[0]}x{self.input_size[1]} but the faces are "
                f"{images.shape[1]}x{images.shape[2]}; align/resize them first"
            )
        return images

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, embedding_size={self.embedding_size})"


def iter_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of at most ``batch_size`` rows (views, no copy)."""
    for start in range(0, images.shape[0], batch_size):
        yield images[start : start + batch_size]


class TorchEmbedder(BaseEmbedder):
    """A torch module (eager or TorchScript) mapping (B, 3, H, W) normalized RGB to (B, D).

    Args:
        module: the backbone; put in eval mode (this mutates the module's training flag).
        device: where to run it ("cpu", "cuda", "cuda:1", a torch.device); default: the module's device.
        batch_size: images per forward.
        channels_last: run with channels-last memory format (faster convolutions on recent GPUs/CPUs).
        half: run in float16 autocast on CUDA.
        name: readable name; default: the module's class name.
        input_size: (H, W) the module expects (None: any).
    """

    def __init__(
        self,
        module: nn.Module,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        channels_last: bool = False,
        *,
        half: bool = False,
        name: str | None = None,
        input_size: tuple[int, int] | None = (112, 112),
    ) -> None:
        import torch

        if device is None:
            param = next(iter(module.parameters()), None)
            device = param.device if param is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.half = bool(half) and self.device.type == "cuda"
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ModelError(f"batch_size must be >= 1, got {batch_size}")
        self.name = name or getattr(module, "original_name", None) or type(module).__name__
        self.input_size = input_size
        self._identity: str | None = None
        h, w = input_size or (112, 112)
        self.embedding_size = int(self._embed_batch(np.zeros((1, h, w, 3), np.uint8)).shape[1])

    @property
    def identity(self) -> str:
        if self._identity is None:
            self._identity = state_dict_hash(self.module.state_dict())
        return self._identity

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().sub_(127.5).div_(127.5)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half):
                out = self.module(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            if out.ndim != 2:
                raise ModelError(f"{self.name}: expected a (B, D) embedding output, got shape {tuple(out.shape)}")
            return out.float().cpu().numpy()


class OnnxEmbedder(BaseEmbedder):
    """An ONNX recognition model run by onnxruntime (input RGB NCHW float ``(x - 127.5) / 127.5``, one output).

    Dynamic and fixed batch dimensions both work (a fixed batch is filled by padding the last chunk). Extra graph
    inputs (old exporters list initializers as inputs, e.g. OpenCV's SFace) are left to their stored values.

    Args:
        path: the .onnx file.
        batch_size: images per run for a dynamic batch dimension.
        providers: onnxruntime execution providers; default: CUDA if available, then CPU.
        threads: intra-op threads (0: onnxruntime's default).
        input_mean: subtracted from the 0..255 pixels (127.5: InsightFace/facetrain convention; 0 for models that
            normalize inside the graph, e.g. SFace).
        input_std: the pixels are then divided by it (127.5, or 1).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int = 64,
        providers: list[str] | None = None,
        threads: int = 0,
        *,
        input_mean: float = 127.5,
        input_std: float = 127.5,
    ) -> None:
        ort = require("onnxruntime", "onnx", "running ONNX models")
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"ONNX model not found: {self.path}")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: old graphs warn about every initializer listed as an input
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            from facetrain.export.graph import session_model

            self.session = ort.InferenceSession(session_model(self.path, providers), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for malformed graphs
            raise ModelError(f"cannot load ONNX model {self.path}: {exc}") from exc
        inputs = self.session.get_inputs()
        images = [i for i in inputs if len(i.shape) == 4 and i.shape[1] == 3]
        if not images:
            shapes = ", ".join(f"{i.name} {i.shape}" for i in inputs)
            raise ModelError(f"{self.path}: expected an image input of shape (B, 3, H, W), found {shapes}")
        self.input_name = images[0].name
        shape = images[0].shape
        self._extra_feed = self._unused_input_feed([i for i in inputs if i.name != self.input_name])
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        h, w = shape[2], shape[3]
        self.input_size = (h, w) if isinstance(h, int) and isinstance(w, int) else None
        self.batch_size = self.fixed_batch or int(batch_size)
        self.name = self.path.stem
        self.input_mean = float(input_mean)
        self.input_std = float(input_std)
        self._identity: str | None = None
        probe = self._embed_batch(np.zeros((1, *(self.input_size or (112, 112)), 3), np.uint8))
        self.embedding_size = int(probe.shape[1])

    @property
    def identity(self) -> str:
        if self._identity is None:
            self._identity = file_hash(self.path)
        return self._identity

    def _unused_input_feed(self, extra_inputs: list) -> dict[str, np.ndarray]:
        """Zeros for graph inputs that have no stored value (weights an old exporter declared but no node reads);
        inputs backed by an initializer keep their stored value."""
        if not extra_inputs:
            return {}
        stored = _onnx_initializer_names(self.path)
        feed = {}
        for inp in extra_inputs:
            if inp.name in stored:
                continue
            if not all(isinstance(d, int) for d in inp.shape):
                raise ModelError(f"{self.path}: extra input {inp.name} {inp.shape} has no fixed shape; one image input")
            dtype = np.float32 if inp.type == "tensor(float)" else np.int64 if inp.type == "tensor(int64)" else None
            if dtype is None:
                raise ModelError(f"{self.path}: extra input {inp.name} of type {inp.type} cannot be filled")
            feed[inp.name] = np.zeros(inp.shape, dtype)
        return feed

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        x = (batch.astype(np.float32).transpose(0, 3, 1, 2) - self.input_mean) / self.input_std
        if self.fixed_batch and n < self.fixed_batch:
            x = np.concatenate([x, np.zeros((self.fixed_batch - n, *x.shape[1:]), np.float32)])
        try:
            out = self.session.run(None, {self.input_name: np.ascontiguousarray(x), **self._extra_feed})[0]
        except Exception as exc:  # onnxruntime's own exception types
            raise ModelError(f"{self.path}: inference failed: {str(exc).splitlines()[0]}") from exc
        out = np.asarray(out, np.float32).reshape(out.shape[0], -1)
        return out[:n]


def _onnx_initializer_names(path: Path) -> set[str]:
    try:
        import onnx
    except ImportError:
        return set()
    model = onnx.load(str(path), load_external_data=False)
    return {init.name for init in model.graph.initializer}


def load_embedder(
    path: str | os.PathLike,
    *,
    device: str | None = None,
    batch_size: int = 64,
    channels_last: bool = False,
    half: bool = False,
    backbone: str | None = None,
    input_mean: float = 127.5,
    input_std: float = 127.5,
    **backbone_kwargs,
) -> BaseEmbedder:
    """Open a model file as an Embedder.

    Accepted: ``.onnx`` (onnxruntime), TorchScript archives, facetrain checkpoints and arcface_torch
    ``backbone.pth`` state dicts (through :func:`facetrain.models.load_backbone`; ``backbone`` names the architecture
    when the file does not say it).

    Args:
        path: model file.
        device: torch device for torch models (default: CUDA if available, else CPU).
        batch_size: images per forward.
        channels_last: torch memory format.
        half: float16 autocast on CUDA.
        backbone: architecture name for plain state dicts (e.g. ``r50``).
        input_mean: ONNX only: ``(x - input_mean) / input_std`` on 0..255 RGB (see :class:`OnnxEmbedder`).
        input_std: ONNX only.
        **backbone_kwargs: passed to ``load_backbone`` (e.g. ``embedding_size``).

    Raises:
        ModelError: missing, unreadable or unrecognized file.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.suffix.lower() == ".onnx":
        return OnnxEmbedder(path, batch_size=batch_size, input_mean=input_mean, input_std=input_std)
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    module = _load_torch_module(path, backbone=backbone, device=device, **backbone_kwargs)
    embedder = TorchEmbedder(
        module, device=device, batch_size=batch_size, channels_last=channels_last, half=half, name=path.stem
    )
    return embedder


def _load_torch_module(path: Path, *, backbone: str | None, device: str, **kwargs) -> nn.Module:
    import torch

    if _is_torchscript(path):
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated but still the loader
                return torch.jit.load(str(path), map_location=device)
        except Exception as exc:  # TorchScript raises RuntimeError subclasses with long messages
            raise ModelError(f"cannot load TorchScript model {path}: {str(exc).splitlines()[0]}") from exc
    try:
        from facetrain.models import load_backbone  # written by the models part; absent in early checkouts
    except ImportError:
        load_backbone = None
    if load_backbone is not None:
        return load_backbone(path, name=backbone, **kwargs)
    return _load_state_dict_fallback(path, backbone=backbone, **kwargs)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding ``<root>/code/`` and ``<root>/constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _load_state_dict_fallback(path: Path, *, backbone: str | None, **kwargs) -> nn.Module:
    """Plain state dict (arcface_torch backbone.pth) or a dict holding one under ``backbone``/``state_dict``."""
    import torch

    from facetrain.models import build_backbone

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read {path} as a torch checkpoint: {str(exc).splitlines()[0]}") from exc
    if isinstance(obj, dict):
        for key in ("backbone", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise ModelError(f"{path} holds no backbone state dict (expected a state dict, TorchScript or facetrain run)")
    if backbone is None:
        raise ModelError(f"{path} is a plain state dict; name its architecture with --backbone (e.g. r50)")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    module = build_backbone(backbone, **kwargs)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{path} does not fit backbone {backbone!r}: {str(exc).splitlines()[0]}") from exc
    return module


def state_dict_hash(state: dict) -> str:
    """16 hex digits of SHA-256 over the names, shapes, dtypes and bytes of a state dict, in key order."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def file_hash(path: str | os.PathLike) -> str:
    """16 hex digits of the SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
