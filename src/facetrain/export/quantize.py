"""Quantize an exported ONNX recognition model with onnxruntime: INT8 dynamic/static, or fp16.

- ``dynamic``: weights to signed INT8 per output channel; activations quantized at run time
  (``onnxruntime.quantization.quantize_dynamic``). No calibration data.
- ``static``: QDQ format, weights signed INT8 per channel, activations unsigned INT8 (onnxruntime's U8S8 kernels, the
  fast path on x86), activation ranges from a calibration set of aligned faces fed through a
  ``CalibrationDataReader`` (MinMax calibration).
  Depthwise convolutions stay float unless asked (see :func:`quantize`).
- ``fp16``: weights and compute in float16 with float32 input/output kept
  (``onnxruntime.transformers.float16.convert_float_to_float16``, shipped inside the onnxruntime wheel).

:func:`compare_models` measures size, CPU latency, agreement with the float model and, given a ``.bin``, the 10-fold
verification accuracy, so one table shows what was gained and what was lost.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facetrain.errors import DataError, ModelError, require
from facetrain.export.onnx import inspect_onnx

logger = logging.getLogger(__name__)

__all__ = ["MODES", "ModelStats", "compare_models", "quantize", "FaceCalibrationReader"]

MODES = ("dynamic", "static", "fp16")
_ACTIVATION_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}


@dataclass
class ModelStats:
    """One row of the quantization table.

    Attributes:
        label: ``fp32``, ``int8-dynamic``, ...
        path: the model file.
        size_mb: file size in MiB.
        latency_ms: median CPU time of one run on a batch of ``batch_size``.
        batch_size: the timed batch.
        images_per_s: ``batch_size / latency``.
        min_cosine: smallest cosine to the reference model's embeddings on the check faces (1.0 for the reference).
        accuracy: 10-fold verification accuracy on the ``.bin`` (None without one).
    """

    label: str
    path: str
    size_mb: float
    latency_ms: float
    batch_size: int
    images_per_s: float
    min_cosine: float
    accuracy: float | None = None


def quantize(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    mode: str,
    calibration: np.ndarray | None = None,
    per_channel: bool = True,
    quantize_depthwise: bool = False,
    activations: str = "uint8",
    prelu: str = "decomposed",
) -> Path:
    """Write a quantized copy of an ONNX model, atomically.

    Args:
        in_path: float32 ONNX model (as written by :func:`facetrain.export.export_onnx`).
        out_path: destination.
        mode: ``dynamic``, ``static`` or ``fp16``.
        calibration: (N, 112, 112, 3) uint8 RGB aligned faces; required for ``static`` (a few hundred is typical).
        per_channel: per-output-channel weight scales (INT8 modes).
        quantize_depthwise: also quantize depthwise convolutions (``group > 1``). Off by default: onnxruntime's
            INT8 depthwise kernels are slower than its float ones on x86, which made INT8 MobileFaceNet slower than
            fp32 in our measurements (benchmarks/bench_embed.py), while skipping them costs little size.
        activations: ``uint8`` (default; onnxruntime's U8S8 kernels, the fast path on x86 with or without VNNI) or
            ``int8`` (S8S8: much slower on x86 in our measurements; an option for ARM) for static mode's activations.
        prelu: ``decomposed`` (default) first rewrites ``PRelu`` nodes (INT8: as ``(1 - slope) * Relu(x) +
            slope * x``, whose ops all have INT8 kernels; fp16: the exact form; see
            :func:`facetrain.export.graph.decompose_prelu`), instead of a dequantize / float PReLU / quantize round
            trip per PReLU; facetrain's exact decomposition (its export default) is rewritten the same way.
            ``native`` quantizes the graph as it is.

    Returns:
        The written path.

    Raises:
        ModelError: unknown mode, unreadable model, or quantization failure.
        DataError: ``static`` without calibration faces.
    """
    from facetrain.export.graph import check_prelu_mode

    if mode not in MODES:
        raise ModelError(f"unknown quantization mode {mode!r}; use one of {', '.join(MODES)}")
    if activations not in _ACTIVATION_TYPES:
        raise ModelError(f"unknown activation type {activations!r}; use one of {', '.join(_ACTIVATION_TYPES)}")
    check_prelu_mode(prelu)
    in_path, out_path = Path(in_path), Path(out_path)
    info = inspect_onnx(in_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".facetrain-quant-", dir=out_path.parent) as tmpdir:
        tmp_out = Path(tmpdir) / "model.onnx"
        source = in_path
        if prelu == "decomposed":  # fp16 keeps float semantics: exact form; INT8: the form with INT8 kernels only
            form = "exact" if mode == "fp16" else "affine"
            source = _decomposed_copy(in_path, Path(tmpdir) / "source.onnx", form)
        try:
            if mode == "fp16":
                _to_fp16(source, tmp_out)
            else:
                quant = require("onnxruntime.quantization", "onnx", "INT8 quantization")
                prepared = Path(tmpdir) / "prepared.onnx"
                _preprocess(quant, source, prepared)
                exclude = [] if quantize_depthwise else _depthwise_convs(prepared)
                if mode == "dynamic":
                    quant.quantize_dynamic(
                        str(prepared),
                        str(tmp_out),
                        weight_type=quant.QuantType.QInt8,
                        per_channel=per_channel,
                        nodes_to_exclude=exclude,
                    )
                else:
                    if calibration is None or len(calibration) == 0:
                        raise DataError(
                            "static quantization needs calibration faces; pass --calib DIR of aligned faces"
                        )
                    reader = FaceCalibrationReader(calibration, info.input_name)
                    quant.quantize_static(
                        str(prepared),
                        str(tmp_out),
                        reader,
                        quant_format=quant.QuantFormat.QDQ,
                        per_channel=per_channel,
                        activation_type=getattr(quant.QuantType, _ACTIVATION_TYPES[activations]),
                        weight_type=quant.QuantType.QInt8,
                        calibrate_method=quant.CalibrationMethod.MinMax,
                        nodes_to_exclude=exclude,
                    )
        except (DataError, ModelError):
            raise
        except Exception as exc:  # onnxruntime.quantization raises plain exceptions with long messages
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{mode} quantization of {in_path} failed: {first}") from exc
        _copy_metadata(in_path, tmp_out, mode)
        os.replace(tmp_out, out_path)
    logger.info("wrote %s (%s)", out_path, mode)
    return out_path


class FaceCalibrationReader:
    """onnxruntime ``CalibrationDataReader`` over aligned faces: yields ``{input_name: (B, 3, H, W) float32}``.

    Args:
        faces: (N, H, W, 3) uint8 RGB.
        input_name: the model's input name.
        batch_size: faces per calibration batch.
    """

    def __init__(self, faces: np.ndarray, input_name: str, batch_size: int = 16) -> None:
        self.faces = np.asarray(faces)
        self.input_name = input_name
        self.batch_size = int(batch_size)
        self._start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start >= len(self.faces):
            return None
        batch = self.faces[self._start : self._start + self.batch_size]
        self._start += self.batch_size
        return {self.input_name: _normalize(batch)}

    def rewind(self) -> None:
        self._start = 0


def compare_models(
    models: list[tuple[str, str | os.PathLike]],
    faces: np.ndarray,
    *,
    bin_path: str | os.PathLike | None = None,
    batch_size: int = 16,
    timing_runs: int = 5,
    threads: int = 0,
) -> list[ModelStats]:
    """Size, CPU latency, agreement with the first model, and verification accuracy of each model.

    Args:
        models: ``[(label, path), ...]``; the first one is the reference for ``min_cosine``.
        faces: (N, 112, 112, 3) uint8 RGB faces for agreement and timing.
        bin_path: optional verification ``.bin`` (flip test, 10 folds).
        batch_size: the timed batch size.
        timing_runs: timed runs after one warm-up; the median is reported.
        threads: onnxruntime intra-op threads (0: its default).
    """
    from facetrain.embed import OnnxEmbedder

    rows: list[ModelStats] = []
    reference: np.ndarray | None = None
    for label, path in models:
        embedder = OnnxEmbedder(path, batch_size=batch_size, providers=["CPUExecutionProvider"], threads=threads)
        emb = embedder.embed(faces).astype(np.float64)
        if reference is None:
            reference = emb
        cos = np.einsum("ij,ij->i", emb, reference) / np.maximum(
            np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1), 1e-12
        )
        batch = np.resize(faces, (batch_size, *faces.shape[1:]))
        embedder.embed(batch)
        times = []
        for _ in range(max(timing_runs, 1)):
            start = time.perf_counter()
            embedder.embed(batch)
            times.append(time.perf_counter() - start)
        latency = float(np.median(times))
        accuracy = None
        if bin_path is not None:
            from facetrain.eval.verification import verify_bin

            accuracy = verify_bin(embedder, bin_path).accuracy_mean
        rows.append(
            ModelStats(
                label=label,
                path=str(path),
                size_mb=Path(path).stat().st_size / 2**20,
                latency_ms=latency * 1000.0,
                batch_size=batch_size,
                images_per_s=batch_size / latency if latency > 0 else float("inf"),
                min_cosine=float(cos.min()),
                accuracy=accuracy,
            )
        )
    return rows


# -- helpers ---------------------------------------------------------------------------------------------------------


def _preprocess(quant, src: Path, dst: Path) -> None:
    """Shape inference + graph optimization before quantization (onnxruntime's recommended ``quant_pre_process``)."""
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as exc:  # pre-processing is an optimization; quantize the original graph if it fails
        logger.warning("quantization pre-processing skipped (%s)", str(exc).splitlines()[0] if str(exc) else exc)
        dst.write_bytes(src.read_bytes())


def _decomposed_copy(src: Path, dst: Path, form: str) -> Path:
    """``src`` with its PReLUs decomposed (in ``form``), written to ``dst``; ``src`` itself when it has none."""
    import onnx

    from facetrain.export.graph import decompose_prelu, restore_prelu

    try:
        proto = onnx.load(str(src))
    except Exception as exc:  # onnx raises DecodeError and others for non-ONNX files
        raise ModelError(f"{src}: not a readable ONNX model ({str(exc).splitlines()[0] if str(exc) else exc})") from exc
    restored = restore_prelu(proto) if form != "exact" else 0  # facetrain's exports hold the exact form
    if not decompose_prelu(proto, form) and not restored:
        return src
    onnx.save(proto, str(dst))
    return dst


def _depthwise_convs(path: Path) -> list[str]:
    """Names of the Conv nodes with ``group > 1``."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [
        node.name
        for node in graph.node
        if node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)
    ]


def _to_fp16(src: Path, dst: Path) -> None:
    import onnx

    float16 = require("onnxruntime.transformers.float16", "onnx", "fp16 conversion")
    model = onnx.load(str(src))
    converted = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(dst))


def _copy_metadata(src: Path, dst: Path, mode: str) -> None:
    """Keep the source's metadata (the quantizers drop it) and record the quantization mode."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    model = onnx.load(str(dst))
    meta.update({p.key: p.value for p in model.metadata_props})
    meta["facetrain.quantization"] = mode
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(dst))


def _normalize(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray((images.astype(np.float32).transpose(0, 3, 1, 2) - 127.5) / 127.5)
