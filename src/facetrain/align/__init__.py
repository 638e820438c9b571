"""Face detection and alignment: photos -> ArcFace-aligned 112x112 faces.

* :mod:`.template`: ``ARCFACE_TEMPLATE``, ``estimate_similarity`` (Umeyama), ``norm_crop`` (InsightFace-exact).
* :mod:`.detectors`: ``build_detector(name, **kw).detect(rgb) -> list[Face]`` (RetinaFace, YuNet, SCRFD, MTCNN).
* :mod:`.exif`: ``read_image`` (upright RGB uint8 from any photo).
* :mod:`.pipeline`: ``align_folder(src, dst, ...)``.

Never imports facetrain.models / heads / engine.
"""

from .detectors import DEFAULT_DETECTOR, Detector, Face, build_detector, list_detectors
from .exif import apply_orientation, decode_image, exif_orientation, read_image
from .pipeline import AlignSummary, PhotoResult, align_folder, align_photo, list_photos, select_faces
from .template import (
    ARCFACE_TEMPLATE,
    estimate_norm,
    estimate_similarity,
    invert_transform,
    norm_crop,
    template_for_size,
    transform_points,
)

__all__ = [
    "ARCFACE_TEMPLATE",
    "DEFAULT_DETECTOR",
    "AlignSummary",
    "Detector",
    "Face",
    "PhotoResult",
    "align_folder",
    "align_photo",
    "apply_orientation",
    "build_detector",
    "decode_image",
    "estimate_norm",
    "estimate_similarity",
    "exif_orientation",
    "invert_transform",
    "list_detectors",
    "list_photos",
    "norm_crop",
    "read_image",
    "select_faces",
    "template_for_size",
    "transform_points",
]
