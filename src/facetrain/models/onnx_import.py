"""Import an ONNX face-recognition model's weights into the matching facetrain CNN (IResNet or MobileFaceNet).

ONNX files do not keep PyTorch parameter names reliably: the TorchScript exporter folds each Conv+BatchNorm pair
into one biased Conv, renames the folded weights (``onnx::Conv_278``) and shares initializers whose values happen to
be equal. So the import is structural: the parameter-carrying ONNX nodes (Conv, BatchNormalization, PRelu, Gemm /
MatMul[+Add]) are read in graph order and matched, with shape checks, to our modules in the order a forward pass
calls them. A folded Conv (or Gemm) with bias followed in our model by a BatchNorm is loaded as conv weights plus an
identity BatchNorm carrying the bias (weight 1, running mean 0, running var 1 - eps), which computes the same
function. BatchNorm ``epsilon`` is taken from the file (InsightFace's older models use 2e-5).
When onnxruntime is installed the result is checked: both models embed the same random batch and must agree.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facetrain.errors import ModelError, require
from facetrain.models.registry import build_backbone

log = logging.getLogger(__name__)

_PASS_THROUGH = {"Identity", "Unsqueeze", "Squeeze", "Reshape", "Cast", "Flatten"}


@dataclass
class _OnnxParam:
    kind: str  # "conv" | "bn" | "prelu" | "linear"
    node: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)


def import_onnx(path: str | os.PathLike, name: str | None = None, *, verify: bool = True, **kwargs) -> nn.Module:
    """Build the facetrain backbone matching an ONNX recognition model and copy its weights in.

    Args:
        path: ``.onnx`` file whose single input is ``(N, 3, 112, 112)`` normalized RGB.
        name: registry name; None infers IResNet depth / MobileFaceNet blocks and scale from the graph.
        verify: compare embeddings with onnxruntime (when installed) and raise if they differ.
        **kwargs: build kwargs overriding inferred ones.
    """
    onnx = require("onnx", "onnx", "ONNX import")
    path = Path(path)
    try:
        proto = onnx.load(str(path))
    except Exception as exc:
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    graph = proto.graph
    _check_input(graph, path)
    params = _onnx_params(graph, onnx, path)
    if name is None:
        name, inferred = _infer_from_params(params, path)
        kwargs = {**inferred, **kwargs}
    model = build_backbone(name, **kwargs).eval()
    _assign(model, params, path, name)
    if verify:
        _verify(model, path)
    return model


def _check_input(graph, path: Path) -> None:
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelError(f"{path}: expected one image input, found {len(inputs)}")
    first = [n for n in graph.node if inputs[0].name in n.input]
    if any(n.op_type not in ("Conv", "Transpose") for n in first):
        ops = ", ".join(n.op_type for n in first)
        raise ModelError(
            f"{path}: the graph preprocesses its input inside ({ops}); only graphs taking normalized RGB straight "
            "into the first Conv can be imported"
        )


def _onnx_params(graph, onnx, path: Path) -> list[_OnnxParam]:
    from onnx import numpy_helper

    const: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumed: set[str] = set()
    params: list[_OnnxParam] = []
    nodes = list(graph.node)
    for idx, node in enumerate(nodes):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        if op == "Constant" and "value" in attrs:
            const[node.output[0]] = numpy_helper.to_array(attrs["value"])
        elif op in _PASS_THROUGH and node.input and node.input[0] in const:
            const[node.output[0]] = const[node.input[0]]  # values only; shapes are checked against the module
        elif op == "Transpose" and node.input[0] in const:  # unfolded exports transpose Linear weights in-graph
            const[node.output[0]] = np.transpose(const[node.input[0]], attrs.get("perm"))
        elif op == "Conv":
            arrays = {"weight": const[node.input[1]]}
            if len(node.input) > 2 and node.input[2]:
                arrays["bias"] = const[node.input[2]]
            params.append(_OnnxParam("conv", node.name, arrays, attrs))
        elif op == "BatchNormalization":
            names = ("weight", "bias", "running_mean", "running_var")
            arrays = {k: const[v] for k, v in zip(names, node.input[1:5], strict=True)}
            params.append(_OnnxParam("bn", node.name, arrays, {"epsilon": attrs.get("epsilon", 1e-5)}))
        elif op == "PRelu":
            params.append(_OnnxParam("prelu", node.name, {"weight": const[node.input[1]]}))
        elif op == "Gemm":
            weight = const[node.input[1]]
            weight = weight if attrs.get("transB", 0) else weight.T
            arrays = {"weight": weight * attrs.get("alpha", 1.0)}
            if len(node.input) > 2 and node.input[2]:
                arrays["bias"] = const[node.input[2]] * attrs.get("beta", 1.0)
            params.append(_OnnxParam("linear", node.name, arrays))
        elif op == "MatMul" and node.input[1] in const:
            arrays = {"weight": const[node.input[1]].T}
            for later in nodes[idx + 1 :]:  # a following Add of a constant is the bias
                if later.op_type == "Add" and node.output[0] in later.input:
                    other = [i for i in later.input if i != node.output[0]]
                    if other and other[0] in const:
                        arrays["bias"] = const[other[0]]
                        consumed.add(later.name)
                    break
            params.append(_OnnxParam("linear", node.name, arrays))
        elif op in ("Softmax", "LayerNormalization"):
            raise ModelError(
                f"{path}: transformer graphs (found {op}) cannot be imported structurally; load the PyTorch "
                "weights (backbone.pth) instead"
            )
    if not params:
        raise ModelError(f"{path}: no Conv / Gemm weights found; not a recognition model")
    return params


def _infer_from_params(params: list[_OnnxParam], path: Path) -> tuple[str, dict]:
    convs = [p for p in params if p.kind == "conv"]
    linears = [p for p in params if p.kind == "linear"]
    if not convs or not linears:
        raise ModelError(f"{path}: cannot infer the architecture (no conv or no linear layer); pass name=")
    kwargs = {"embedding_size": int(linears[-1].arrays["weight"].shape[0])}
    # Grouped 3x3 convs mark MobileFaceNet (a GDC head's 7x7 depthwise conv does not).
    grouped = [p for p in convs if p.attrs.get("group", 1) > 1 and p.arrays["weight"].shape[-1] == 3]
    if not grouped:
        from facetrain.models.iresnet import IRESNET_LAYERS

        # IResNet: two 3x3 convs per block; the block's width is its output channels.
        widths = [int(p.arrays["weight"].shape[0]) for p in convs[1:] if p.arrays["weight"].shape[-1] == 3]
        layers = tuple(widths.count(c) // 2 for c in (64, 128, 256, 512))
        depth = next((d for d, lay in IRESNET_LAYERS.items() if lay == layers), None)
        if depth is None:
            raise ModelError(f"{path}: a plain CNN with {layers} blocks per stage is no registered IResNet; pass name=")
        in_features = linears[0].arrays["weight"].shape[1]
        if in_features == 512:
            kwargs["head"] = "gdc"
        return f"iresnet{depth}", kwargs
    # MobileFaceNet: grouped 3x3 convs, split into stages at the stride-2 ones.
    segments: list[int] = [0]
    for p in grouped:
        if tuple(p.attrs.get("strides", (1, 1))) == (2, 2):
            segments.append(0)
        else:
            segments[-1] += 1
    if len(segments) != 4:
        raise ModelError(f"{path}: grouped-conv network with {len(segments)} stages is no MobileFaceNet; pass name=")
    kwargs["blocks"] = tuple(segments)
    kwargs["scale"] = int(convs[0].arrays["weight"].shape[0]) // 64
    if linears[0].arrays["weight"].shape[1] != 512:
        kwargs["head"] = "e"
    return "mobilefacenet", kwargs


def _call_order(model: nn.Module) -> list[nn.Module]:
    order: list[nn.Module] = []
    kinds = (nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.PReLU, nn.Linear)
    handles = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(mod)) for m in model.modules() if isinstance(m, kinds)
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, 112, 112))
    finally:
        for h in handles:
            h.remove()
    return order


def _assign(model: nn.Module, params: list[_OnnxParam], path: Path, name: str) -> None:
    modules = _call_order(model)
    names = {m: n for n, m in model.named_modules()}
    i = j = 0

    def fail(msg: str) -> ModelError:
        return ModelError(f"{path}: ONNX weights do not fit backbone {name!r} at {names.get(modules[i], '?')}: {msg}")

    def copy(dst: torch.Tensor, src: np.ndarray) -> None:
        if src.size != dst.numel():
            raise fail(f"ONNX node has {src.size} values, module tensor {tuple(dst.shape)}")
        dst.copy_(torch.from_numpy(np.array(src, dtype=np.float32, copy=True)).reshape(dst.shape).to(dst.dtype))

    with torch.no_grad():
        while i < len(modules):
            mod = modules[i]
            if j >= len(params):
                raise fail("the ONNX graph has fewer weighted layers than the model")
            p = params[j]
            expected = {nn.Conv2d: "conv", nn.Linear: "linear", nn.PReLU: "prelu"}.get(type(mod), "bn")
            if p.kind != expected:
                raise fail(f"expected a {expected} node, found {p.kind} ({p.node})")
            if p.kind in ("conv", "linear"):
                if tuple(p.arrays["weight"].shape) != tuple(mod.weight.shape):
                    raise fail(f"weight shape {tuple(p.arrays['weight'].shape)} vs {tuple(mod.weight.shape)}")
                copy(mod.weight, p.arrays["weight"])
                bias = p.arrays.get("bias")
                nxt = modules[i + 1] if i + 1 < len(modules) else None
                if mod.bias is not None:
                    copy(mod.bias, bias if bias is not None else np.zeros(mod.bias.shape, np.float32))
                elif bias is not None:
                    if not isinstance(nxt, (nn.BatchNorm2d, nn.BatchNorm1d)):
                        raise fail(f"{p.node} has a bias but the model's layer has none and no BatchNorm follows")
                    # Folded Conv+BN: keep the folded weights, make the BatchNorm an identity plus the bias.
                    nxt.weight.fill_(1.0)
                    copy(nxt.bias, bias)
                    nxt.running_mean.zero_()
                    nxt.running_var.fill_(1.0 - nxt.eps)
                    i += 1
            elif p.kind == "bn":
                for key in ("weight", "bias", "running_mean", "running_var"):
                    copy(getattr(mod, key), p.arrays[key])
                mod.eps = float(p.attrs["epsilon"])
            else:
                copy(mod.weight, p.arrays["weight"])
            i += 1
            j += 1
    if j != len(params):
        raise ModelError(f"{path}: {len(params) - j} ONNX weighted layers left over after filling backbone {name!r}")


def _verify(model: nn.Module, path: Path) -> None:
    try:
        ort = require("onnxruntime", "onnx", "checking an ONNX import")
    except Exception:
        log.warning("onnxruntime not installed: the ONNX import of %s is not checked numerically", path)
        return
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = sess.get_inputs()[0]
    batch = meta.shape[0] if isinstance(meta.shape[0], int) else 2
    x = torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    ref = sess.run(None, {meta.name: x.numpy()})[0]
    with torch.no_grad():
        ours = model(x).numpy()
    err = float(np.abs(ours - ref).max()) / max(float(np.abs(ref).max()), 1e-6)
    if ours.shape != ref.shape or err > 1e-3:
        raise ModelError(
            f"{path}: imported weights do not reproduce the ONNX model (relative max error {err:.2e}); the graph "
            "differs from the facetrain architecture; pass the right name="
        )
    log.info("ONNX import of %s checked against onnxruntime: relative max error %.1e", path, err)
