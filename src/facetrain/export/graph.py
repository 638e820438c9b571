"""ONNX graph rewrites that make recognition models faster on onnxruntime's CPU provider.

``PRelu`` is the one op of IResNet / MobileFaceNet that onnxruntime's x86 kernels handle badly: its per-channel slope
goes through the generic broadcasting path and breaks the NCHWc layout that the surrounding convolutions run in, and
INT8 graphs have to dequantize around it. :func:`decompose_prelu` replaces each ``PRelu(x, slope)`` with

- ``exact``: ``Relu(x) + slope * Min(x, 0)`` (bit-exact in float32, because exactly one term is nonzero), which
  onnxruntime runs as vectorized element-wise kernels: what ``facetrain export onnx`` writes and what CPU sessions
  run (:func:`session_model`);
- ``affine``: ``(1 - slope) * Relu(x) + slope * x``, whose ops all have INT8 kernels: what
  ``facetrain export quantize`` quantizes (after :func:`restore_prelu` has turned an exact form back into ``PRelu``).

Measured in CPU time on one thread (benchmarks/bench_quantize.py, benchmarks/RESULTS.md): the exact form makes fp32
iresnet18 1.24x and MobileFaceNet 1.88x faster than native ``PRelu``; static INT8 with the affine form and unsigned
activations runs at 2.9x (iresnet18) and 3.2x (iresnet50) the decomposed fp32 graph.

None of the new node names starts with ``Sub``/``Mul`` (InsightFace's router reads node names to guess whether
normalization is inside the graph), and the rewrites leave graph inputs, outputs and metadata alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

__all__ = [
    "PRELU_MODES",
    "check_prelu_mode",
    "count_ops",
    "cpu_only",
    "cpu_session_model",
    "decompose_prelu",
    "restore_prelu",
    "session_model",
]

PRELU_MODES = ("decomposed", "native")


def check_prelu_mode(prelu: str) -> None:
    """Raise :class:`~facetrain.errors.ModelError` unless ``prelu`` is one of :data:`PRELU_MODES`."""
    from facetrain.errors import ModelError

    if prelu not in PRELU_MODES:
        raise ModelError(f"unknown prelu mode {prelu!r}; use one of {', '.join(PRELU_MODES)}")


def cpu_only(providers: list) -> bool:
    """Whether an onnxruntime provider list (names or ``(name, options)`` tuples) is the CPU provider alone."""
    return [p[0] if isinstance(p, tuple) else p for p in providers] == ["CPUExecutionProvider"]


def decompose_prelu(proto: onnx.ModelProto, form: str = "exact") -> int:
    """Rewrite every ``PRelu`` whose slope is a float constant (an initializer, or an ``Identity`` of one) as
    element-wise ops, in place.

    Args:
        proto: a model (modified in place; its main graph only, which is where exporters put the PReLUs).
        form: ``exact``: ``Relu(x) + slope * Min(x, 0)`` (bit-exact in float); ``affine``:
            ``(1 - slope) * Relu(x) + slope * x`` (equal up to float rounding), for a graph about to be quantized:
            every op in it has an INT8 kernel (``Min`` has none, so it costs a dequantize / float / quantize round
            trip; measured 5-8% faster INT8 iresnet18 and MobileFaceNet).

    Returns:
        The number of ``PRelu`` nodes rewritten (those with a computed slope are left as they are).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    if form not in ("exact", "affine"):
        raise ValueError(f"unknown PReLU form {form!r}; use 'exact' or 'affine'")
    graph = proto.graph
    slopes = {init.name: init for init in graph.initializer}
    for node in graph.node:  # exporters deduplicate equal slopes through Identity nodes: a constant all the same
        if node.op_type == "Identity" and node.input and node.input[0] in slopes:
            slopes[node.output[0]] = slopes[node.input[0]]
    used = {name for node in graph.node for name in (*node.input, *node.output, node.name)}
    used |= {init.name for init in graph.initializer}
    used |= {v.name for v in (*graph.input, *graph.output, *graph.value_info)}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        return name

    float_types = _float_types()
    zeros: dict[int, str] = {}  # ONNX elem type -> name of a scalar 0 initializer
    nodes = []
    rewritten = 0
    for node in graph.node:
        slope = slopes.get(node.input[1]) if node.op_type == "PRelu" and len(node.input) == 2 else None
        if slope is None or slope.data_type not in float_types:
            nodes.append(node)
            continue
        x, s = node.input
        (y,) = node.output
        base = "prelu_" + ((node.name or y).strip("/").replace("/", "_") or "node")
        positive = fresh(f"{base}_pos")
        relu = helper.make_node("Relu", [x], [positive], name=fresh(f"{base}/relu"))
        if form == "affine":
            values = numpy_helper.to_array(slope)
            rest = numpy_helper.from_array((1 - values).astype(values.dtype), fresh(f"{base}_one_minus_slope"))
            graph.initializer.append(rest)
            kept, linear = fresh(f"{base}_pos_scaled"), fresh(f"{base}_linear")
            nodes += [
                relu,
                helper.make_node("Mul", [positive, rest.name], [kept], name=fresh(f"{base}/keep")),
                helper.make_node("Mul", [x, s], [linear], name=fresh(f"{base}/slope")),
                helper.make_node("Add", [kept, linear], [y], name=fresh(f"{base}/sum")),
            ]
        else:
            if slope.data_type not in zeros:
                zero = numpy_helper.from_array(np.zeros((), float_types[slope.data_type]), fresh("facetrain_zero"))
                graph.initializer.append(zero)
                zeros[slope.data_type] = zero.name
            negative, scaled = fresh(f"{base}_neg"), fresh(f"{base}_neg_scaled")
            nodes += [
                relu,
                helper.make_node("Min", [x, zeros[slope.data_type]], [negative], name=fresh(f"{base}/min0")),
                helper.make_node("Mul", [negative, s], [scaled], name=fresh(f"{base}/slope")),
                helper.make_node("Add", [positive, scaled], [y], name=fresh(f"{base}/sum")),
            ]
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        logger.debug("decomposed %d PRelu nodes", rewritten)
    return rewritten


def restore_prelu(proto: onnx.ModelProto) -> int:
    """Turn each exact decomposition ``Add(Relu(x), Mul(Min(x, 0), slope))`` (as :func:`decompose_prelu` writes it,
    in either operand order) back into one ``PRelu(x, slope)`` node, in place; returns how many.

    Only quadruples whose intermediate tensors feed nothing else are restored, so the graph computes the same.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    nodes = list(graph.node)
    consts = {init.name: init for init in graph.initializer}
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    uses: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    outputs = {v.name for v in graph.output}

    def private(name: str) -> bool:  # read by exactly one node and not a graph output
        return uses.get(name, 0) == 1 and name not in outputs

    def is_zero(name: str) -> bool:
        init = consts.get(name)
        return init is not None and numpy_helper.to_array(init).size == 1 and not numpy_helper.to_array(init).any()

    replaced: dict[int, onnx.NodeProto] = {}  # index of the Add -> its PRelu
    dropped: set[int] = set()
    zeros: set[str] = set()
    for index, add in enumerate(nodes):
        if add.op_type != "Add" or len(add.input) != 2 or not all(n in producer for n in add.input):
            continue
        a, b = (producer[name] for name in add.input)
        relu, mul = (a, b) if nodes[a].op_type == "Relu" else (b, a)
        if nodes[relu].op_type != "Relu" or nodes[mul].op_type != "Mul" or not all(private(n) for n in add.input):
            continue
        mul_inputs = list(nodes[mul].input)
        k = next((i for i, n in enumerate(mul_inputs) if n in producer and nodes[producer[n]].op_type == "Min"), None)
        if k is None or len(mul_inputs) != 2 or not private(mul_inputs[k]):
            continue
        minimum, slope = producer[mul_inputs[k]], mul_inputs[1 - k]
        x = nodes[relu].input[0]
        min_inputs = list(nodes[minimum].input)
        if len(min_inputs) != 2 or x not in min_inputs or not is_zero(min_inputs[1 - min_inputs.index(x)]):
            continue
        replaced[index] = helper.make_node("PRelu", [x, slope], list(add.output), name=add.name + "_prelu")
        dropped |= {relu, minimum, mul}
        zeros.add(min_inputs[1 - min_inputs.index(x)])
    if replaced:
        kept = [replaced.get(i, node) for i, node in enumerate(nodes) if i not in dropped]
        del graph.node[:]
        graph.node.extend(kept)
        still_read = {name for node in kept for name in node.input} | outputs
        unused = [init for init in graph.initializer if init.name in zeros and init.name not in still_read]
        for init in unused:  # the zero constants nothing reads any more
            graph.initializer.remove(init)
    return len(replaced)


def count_ops(proto: onnx.ModelProto) -> dict[str, int]:
    """``{op_type: count}`` over the main graph."""
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _float_types() -> dict:
    import numpy as np
    from onnx import TensorProto

    return {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}


def cpu_session_model(path: str | os.PathLike) -> str | bytes:
    """What to hand ``onnxruntime.InferenceSession`` for a CPU session: the model bytes with its PReLUs decomposed
    (:func:`decompose_prelu`) when it has any, else the path itself (also for files with external data, which
    cannot be passed as bytes, or that ``onnx`` cannot parse: the session then reports the problem).

    The rewrite is exact, so embeddings do not change; the file on disk is not touched.
    """
    path = Path(path)
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not parseable by onnx: leave the error to onnxruntime's loader, which names it
        return str(path)
    if any(init.data_location == 1 for init in proto.graph.initializer):  # TensorProto.EXTERNAL
        return str(path)
    if not decompose_prelu(proto):
        return str(path)
    return proto.SerializeToString()


def session_model(path: str | os.PathLike, providers: list) -> str | bytes:
    """The model to open an onnxruntime session with: :func:`cpu_session_model` when the CPU provider runs it alone,
    else the path (GPU providers run native ``PRelu`` as one fused kernel)."""
    return cpu_session_model(path) if cpu_only(providers) else str(path)
