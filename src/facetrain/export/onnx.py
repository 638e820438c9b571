"""Export a backbone to ONNX in the form InsightFace's python package loads as a recognition model.

The exported graph follows the conventions of REFERENCE section 8 (``insightface.model_zoo``):

- one input named ``data``, shape ``(batch, 3, 112, 112)``: static H and W, symbolic batch dimension;
- RGB NCHW float32 normalized **outside** the graph, ``(x - 127.5) / 127.5``, so the model holds no Sub/Mul
  normalization nodes, and none of the first 8 nodes is named ``Sub*``/``_minus*``/``Mul*``/``_mul*`` (the router
  would otherwise assume mean 0, std 1 and feed raw pixels);
- exactly one output, the **unnormalized** (B, D) embedding;
- ``metadata_props``: embedding size, input layout, mean/std, facetrain version, the source checkpoint's SHA-256.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from facetrain.errors import ModelError, require
from facetrain.fileio import atomic_path

if TYPE_CHECKING:
    import onnx
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "INPUT_MEAN",
    "INPUT_STD",
    "OnnxInfo",
    "export_onnx",
    "inspect_onnx",
    "load_model_for_export",
    "file_sha256",
]

INPUT_MEAN = 127.5
INPUT_STD = 127.5
INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
DEFAULT_OPSET = 17
# InsightFace's ArcFaceONNX looks at the first 8 node names to guess whether normalization is in the graph.
_ROUTER_NODE_WINDOW = 8
_NORMALIZATION_PREFIXES = ("Sub", "_minus", "Mul", "_mul")


@dataclass
class OnnxInfo:
    """What a deployment tool sees in an ONNX recognition model.

    Attributes:
        path: the file.
        input_name: name of the (first) input.
        input_shape: the input dims, ints for static dims and strings for symbolic ones.
        n_inputs: number of graph inputs (initializers excluded).
        n_outputs: number of graph outputs.
        output_shape: dims of the first output.
        first_node_names: names of the first 8 nodes (InsightFace's normalization guess reads them).
        n_nodes: number of nodes in the main graph.
        opset: the default-domain opset version.
        metadata: ``metadata_props`` as a dict.
        initializer_dtypes: numpy dtype names of the initializers, each counted once.
        size_bytes: file size.
    """

    path: Path
    input_name: str
    input_shape: list
    n_inputs: int
    n_outputs: int
    output_shape: list
    first_node_names: list[str]
    n_nodes: int
    opset: int
    metadata: dict[str, str] = field(default_factory=dict)
    initializer_dtypes: list[str] = field(default_factory=list)
    size_bytes: int = 0

    @property
    def static_hw(self) -> bool:
        """H and W are positive integers (InsightFace compares them with 112)."""
        return len(self.input_shape) == 4 and all(isinstance(d, int) and d > 0 for d in self.input_shape[2:])

    @property
    def dynamic_batch(self) -> bool:
        """The batch dimension is symbolic (a string) or unset."""
        return len(self.input_shape) == 4 and not isinstance(self.input_shape[0], int)

    @property
    def normalization_in_graph_guess(self) -> bool:
        """InsightFace's guess: a Sub*/_minus* node and a Mul*/_mul* node among the first 8 nodes."""
        names = self.first_node_names[:_ROUTER_NODE_WINDOW]
        has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
        has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
        return has_sub and has_mul


def load_model_for_export(
    model: str | os.PathLike | None,
    *,
    backbone: str | None = None,
    embedding_size: int = 512,
    **backbone_kwargs,
) -> tuple[nn.Module, str | None, str]:
    """Open what ``facetrain export`` is given.

    Args:
        model: anything :func:`facetrain.models.load_backbone` accepts (facetrain checkpoint, arcface_torch
            ``backbone.pth``, TorchScript, ONNX), or None to build ``backbone`` with random weights (seed 0, so the
            same weights in every process).
        backbone: registry name (architecture of a plain state dict, or the random-init model when ``model`` is None).
        embedding_size: D for a random-init model.
        **backbone_kwargs: build kwargs (``scale``, ``blocks``, ...).

    Returns:
        ``(module in eval mode on the CPU, SHA-256 of the source file or None, a readable name)``.

    Raises:
        ModelError: neither a file nor a backbone name, or an unreadable file.
    """
    from facetrain.models import build_backbone, load_backbone

    if model is None:
        if backbone is None:
            raise ModelError("give a model file or --backbone NAME (random weights) to export")
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random weights in every process (export, then check)
            module = build_backbone(backbone, embedding_size=embedding_size, **backbone_kwargs)
        return module.eval(), None, backbone
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file; pass a checkpoint, backbone.pth, TorchScript or ONNX file")
    module = load_backbone(path, name=backbone, **backbone_kwargs)
    return module.eval(), file_sha256(path), path.stem


def export_onnx(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    input_size: int = 112,
    opset: int = DEFAULT_OPSET,
    source_sha256: str | None = None,
    name: str | None = None,
    dynamo: bool = False,
    prelu: str = "decomposed",
) -> OnnxInfo:
    """Export a backbone (eager or TorchScript module) to an InsightFace-compatible ONNX file, atomically.

    Args:
        model: maps (B, 3, S, S) normalized RGB to (B, D) (a tuple output's first element is taken).
        out: destination ``.onnx`` path.
        input_size: S, the static square input size (112 for every standard backbone).
        opset: default-domain opset (17+).
        source_sha256: SHA-256 of the checkpoint the weights came from, stored in the metadata.
        name: model name stored in the metadata.
        dynamo: use the ``torch.export`` based exporter (needs ``onnxscript``); the default is the TorchScript-based
            one, which gives a symbolic batch dimension directly.
        prelu: ``decomposed`` (default) writes each PReLU as the exact ``Relu(x) + slope * Min(x, 0)``, which
            onnxruntime's CPU provider runs faster (1.24x iresnet18, 1.88x MobileFaceNet on one thread) and
            quantizes better (:mod:`facetrain.export.graph`);
            ``native`` keeps ONNX ``PRelu`` nodes (one fused kernel on GPU runtimes such as TensorRT).

    Returns:
        :class:`OnnxInfo` of the written file.

    Raises:
        ModelError: the export fails or the graph breaks a convention above.
    """
    import torch

    onnx = require("onnx", "onnx", "ONNX export")
    from facetrain.export.graph import check_prelu_mode, decompose_prelu

    check_prelu_mode(prelu)
    if input_size < 112 or input_size % 16:
        raise ModelError(f"input_size must be >= 112 and a multiple of 16 (InsightFace's rule), got {input_size}")
    out = Path(out)
    wrapped = _first_output(model).eval()
    dummy = torch.zeros(2, 3, input_size, input_size)
    with torch.no_grad():
        reference = wrapped(dummy)
    if reference.ndim != 2:
        raise ModelError(f"the model returns shape {tuple(reference.shape)}; expected a (B, D) embedding")
    embedding_size = int(reference.shape[1])

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".facetrain-export-", dir=out.parent) as tmpdir:
        raw_path = Path(tmpdir) / "raw.onnx"
        kwargs: dict = dict(
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            do_constant_folding=True,
        )
        if dynamo:
            batch = torch.export.Dim("batch", min=1)
            kwargs.update(dynamo=True, dynamic_shapes=({0: batch},), external_data=False)
        else:
            kwargs.update(dynamo=False, dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # The TorchScript-based exporter is chosen on purpose (symbolic batch, no onnxscript needed).
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # parity is checked instead
                torch.onnx.export(wrapped, (dummy,), str(raw_path), **kwargs)
        except Exception as exc:  # exporter errors are many types with multi-line messages
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"ONNX export of {name or type(model).__name__} failed: {first}") from exc
        proto = onnx.load(str(raw_path))
        if prelu == "decomposed":
            decompose_prelu(proto)
        _fix_graph(proto, embedding_size=embedding_size)
        _set_metadata(
            proto,
            {
                "facetrain.embedding_size": str(embedding_size),
                "facetrain.input_layout": f"NCHW RGB float32 {input_size}x{input_size}",
                "facetrain.input_mean": str(INPUT_MEAN),
                "facetrain.input_std": str(INPUT_STD),
                "facetrain.normalization": "outside the graph: (x - 127.5) / 127.5; output not L2-normalized",
                "facetrain.version": _facetrain_version(),
                "facetrain.source_sha256": source_sha256 or "random-init",
                "facetrain.model": name or type(model).__name__,
                "facetrain.prelu": prelu,
            },
        )
        proto.producer_name = "facetrain"
        proto.producer_version = _facetrain_version()
        try:
            onnx.checker.check_model(proto)
        except Exception as exc:
            raise ModelError(f"exported graph fails onnx.checker: {str(exc).splitlines()[0]}") from exc
        _save_atomic(proto, out)
    info = inspect_onnx(out)
    problems = deployment_problems(info)
    if problems:
        out.unlink(missing_ok=True)
        raise ModelError(f"exported {out} breaks InsightFace's conventions: {'; '.join(problems)}")
    logger.info("wrote %s (%d nodes, opset %d, D=%d)", out, info.n_nodes, info.opset, embedding_size)
    return info


def inspect_onnx(path: str | os.PathLike) -> OnnxInfo:
    """Read the deployment-relevant facts of an ONNX file (shapes, node names, metadata, dtypes).

    Raises:
        ModelError: missing file or not an ONNX model.
    """
    onnx = require("onnx", "onnx", "reading ONNX models")
    from onnx import helper

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelError(f"{path}: not an ONNX model ({type(exc).__name__}); pass a file written by export") from exc
    graph = proto.graph
    if not graph.input and not graph.node:
        raise ModelError(f"{path}: not an ONNX model (empty graph); pass a file written by export")
    init_names = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if not inputs:
        raise ModelError(f"{path}: the ONNX graph has no input")
    dtypes = sorted({helper.tensor_dtype_to_np_dtype(i.data_type).name for i in graph.initializer})
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxInfo(
        path=path,
        input_name=inputs[0].name,
        input_shape=_dims(inputs[0]),
        n_inputs=len(inputs),
        n_outputs=len(graph.output),
        output_shape=_dims(graph.output[0]) if graph.output else [],
        first_node_names=[n.name for n in graph.node[:_ROUTER_NODE_WINDOW]],
        n_nodes=len(graph.node),
        opset=int(opset),
        metadata={p.key: p.value for p in proto.metadata_props},
        initializer_dtypes=dtypes,
        size_bytes=path.stat().st_size,
    )


def deployment_problems(info: OnnxInfo) -> list[str]:
    """Reasons InsightFace would not load ``info`` as an ArcFace recognition model as we intend (empty: fine)."""
    problems = []
    if len(info.input_shape) != 4:
        problems.append(f"input {info.input_name!r} has shape {info.input_shape}, expected (batch, 3, H, W)")
        return problems
    if not info.static_hw:
        problems.append(f"input H, W are {info.input_shape[2:]}, must be static integers")
    elif info.input_shape[2] != info.input_shape[3] or info.input_shape[2] < 112 or info.input_shape[2] % 16:
        problems.append(f"input {info.input_shape[2]}x{info.input_shape[3]} is not square, >= 112 and a multiple of 16")
    if info.input_shape[1] != 3:
        problems.append(f"input has {info.input_shape[1]} channels, expected 3")
    if info.n_outputs != 1:
        problems.append(f"{info.n_outputs} outputs, InsightFace needs exactly one")
    if info.normalization_in_graph_guess:
        problems.append(f"first nodes {info.first_node_names} look like in-graph normalization to InsightFace")
    return problems


def file_sha256(path: str | os.PathLike) -> str:
    """Full hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- helpers ---------------------------------------------------------------------------------------------------------


def _first_output(model: nn.Module) -> nn.Module:
    """Wrap ``model`` so the graph has one output (the first element of a tuple/list output)."""
    from torch import nn

    class FirstOutput(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            return out

    return FirstOutput(model)


def _fix_graph(proto: onnx.ModelProto, *, embedding_size: int) -> None:
    """Rename nodes InsightFace would misread, name the batch dim, and pin the output's feature dim."""
    used = {n.name for n in proto.graph.node}
    for index, node in enumerate(proto.graph.node[:_ROUTER_NODE_WINDOW]):
        if node.name.startswith(_NORMALIZATION_PREFIXES) or not node.name:
            new = f"facetrain/{node.op_type}_{index}"
            while new in used:
                new += "_"
            used.add(new)
            node.name = new
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if dims and not dims[0].HasField("dim_value"):
        dims[0].dim_param = "batch"
    out_dims = proto.graph.output[0].type.tensor_type.shape.dim
    if len(out_dims) == 2:
        if not out_dims[0].HasField("dim_value"):
            out_dims[0].dim_param = "batch"
        out_dims[1].dim_value = embedding_size


def _set_metadata(proto: onnx.ModelProto, values: dict[str, str]) -> None:
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    for key, value in [*kept, *values.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _save_atomic(proto: onnx.ModelProto, out: Path) -> None:
    import onnx

    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))


def _dims(value_info) -> list:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return dims


def _facetrain_version() -> str:
    from facetrain import __version__

    return str(__version__)
