"""Errors a user can cause. The CLI prints ``str(error)`` as one line and exits with code 1.

Every message names the file / record / field involved and says what to do.
"""

from __future__ import annotations


class FacetrainError(Exception):
    """Base class of every error caused by user input (files, configs, arguments)."""


class ConfigError(FacetrainError):
    """A config key, type or value is invalid."""


class DataError(FacetrainError):
    """A dataset, record, image or data file is missing, malformed or inconsistent."""


class ModelError(FacetrainError):
    """A model name, checkpoint or weight file is unknown, unreadable or does not fit."""


class EvalError(FacetrainError):
    """Evaluation inputs (pairs, protocols, meta files) are malformed."""


class DependencyError(FacetrainError):
    """An optional dependency is missing; the message names the pip extra to install."""


def require(module: str, extra: str, feature: str):
    """Import an optional dependency lazily, or raise DependencyError naming the extra.

    Args:
        module: importable module name, e.g. ``"onnxruntime"``.
        extra: facetrain extra that provides it, e.g. ``"onnx"``.
        feature: what needs it, for the message.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        raise DependencyError(
            f"{feature} needs the optional package '{module}' ({type(exc).__name__}: {exc}); "
            f"install it with: pip install 'facetrain[{extra}]'"
        ) from exc


def closest(name: str, candidates) -> str | None:
    """The candidate most similar to ``name`` (for 'did you mean' hints), or None."""
    import difflib

    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return found[0] if found else None
