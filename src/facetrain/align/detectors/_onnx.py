"""onnxruntime session creation shared by the ONNX detectors (lazy import, quiet logs, one-line errors)."""

from __future__ import annotations

from pathlib import Path

from facetrain.errors import ModelError, require


def make_session(model: str | Path | bytes, *, num_threads: int = 0, what: str = "detector"):
    """An onnxruntime CPU ``InferenceSession`` for a model file path or serialized bytes.

    Args:
        model: path to a ``.onnx`` file, or the model's bytes.
        num_threads: intra-op threads; 0 lets onnxruntime decide.
        what: names the model in error messages.
    """
    ort = require("onnxruntime", "onnx", f"the {what}")
    if not isinstance(model, bytes):
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"{what} model file not found: {path}; pass an existing .onnx path")
        model = str(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the mnet0.25 export carries unused initializers that log warnings
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        shown = model if isinstance(model, str) else "<bytes>"
        raise ModelError(f"cannot load {what} ONNX model {shown}: {str(exc).splitlines()[0][:200]}") from exc
