"""MTCNN (Zhang et al. 2016, "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional
Networks") in PyTorch, loading facenet-pytorch's P/R/O-Net state dicts (``pnet.pt``, ``rnet.pt``, ``onet.pt``).

The cascade: P-Net scans an image pyramid (scale factor 0.709, smallest face 20 px) and proposes boxes; R-Net
re-scores 24x24 crops; O-Net re-scores 48x48 crops and regresses 5 landmarks. Inputs are RGB ``(x - 127.5) / 128``.
The networks' flatten order is (W, H, C), inherited from the original Caffe weights.
torch is imported lazily, inside this module only.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from facetrain.errors import ModelError, require

from .base import Detector, RawDetections, nms

STAGE_THRESHOLDS = (0.6, 0.7, 0.7)


class MTCNNDetector(Detector):
    """MTCNN on CPU/GPU with PyTorch.

    Args:
        weights_dir: folder with ``pnet.pt``, ``rnet.pt``, ``onet.pt`` (facenet-pytorch's state dicts).
        score_threshold: O-Net probability to keep a face (default 0.95; the cascade's own stage thresholds are
            0.6 / 0.7 / 0.7, and real faces in the assets score >= 0.97).
        nms_threshold: final NMS IoU (default 0.7 over the intersection-over-minimum pass).
        min_face_size: smallest face side in pixels searched by the pyramid (default 20).
        scale_factor: pyramid step (default 0.709).
        max_side: photos are shrunk to this longer side for detection (default 1280).
        device: torch device string.
    """

    name = "mtcnn"

    def __init__(
        self,
        weights_dir: str | Path | None = None,
        *,
        score_threshold: float = 0.95,
        nms_threshold: float = 0.7,
        min_face_size: int = 20,
        scale_factor: float = 0.709,
        max_side: int | None = 1280,
        device: str = "cpu",
        model_path: str | Path | None = None,
    ):
        super().__init__(score_threshold=score_threshold, nms_threshold=nms_threshold, max_side=max_side)
        weights_dir = weights_dir if weights_dir is not None else model_path
        if weights_dir is None:
            raise ModelError(
                "the mtcnn detector needs weights_dir (--model) = a folder holding pnet.pt, rnet.pt and onet.pt"
            )
        self.torch = require("torch", "core", "the MTCNN detector")
        self.weights_dir = Path(weights_dir)
        self.min_face_size = int(min_face_size)
        self.scale_factor = float(scale_factor)
        self.device = self.torch.device(device)
        nets = _networks(self.torch)
        # channels_last: ~30% faster CPU convolutions for these 3-to-64-channel layers
        self.pnet, self.rnet, self.onet = (
            _load(net_cls(), self.weights_dir / f"{name}.pt", self.torch)
            .to(self.device, memory_format=self.torch.channels_last)
            .eval()
            for name, net_cls in zip(("pnet", "rnet", "onet"), nets)
        )

    def _forward(self, image_rgb: np.ndarray) -> RawDetections:
        image = image_rgb.astype(np.float32)
        with self.torch.inference_mode():
            boxes = self._propose(image)
            if len(boxes):
                boxes = self._refine(image, boxes)
            if not len(boxes):
                return RawDetections.empty()
            return self._output(image, boxes)

    def _run(self, net, batch: np.ndarray):
        """Run a network on (N, H, W, 3) normalized crops; returns numpy outputs."""
        # an NHWC array viewed as NCHW is already channels_last in memory
        data = self.torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(self.device)
        return [out.cpu().numpy() for out in net(data)]

    # stage 1: P-Net over the pyramid -> (K, 5) x1, y1, x2, y2, score
    def _propose(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        scale = 12.0 / self.min_face_size
        side = min(height, width) * scale
        candidates = []
        while side >= 12:
            size = (int(width * scale + 1), int(height * scale + 1))
            data = (cv2.resize(image, size, interpolation=cv2.INTER_AREA) - 127.5) * 0.0078125
            regression, probs = self._run(self.pnet, data[None])
            candidates.append(_grid_boxes(regression[0], probs[0, 1], scale))
            scale *= self.scale_factor
            side *= self.scale_factor
        boxes = np.concatenate(candidates) if candidates else np.zeros((0, 9))
        if not len(boxes):
            return boxes[:, :5]
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        refined = boxes[:, :4] + boxes[:, 5:9] * np.stack([widths, heights, widths, heights], axis=1)
        return _square(np.concatenate([refined, boxes[:, 4:5]], axis=1))

    # stage 2: R-Net on 24x24 crops
    def _refine(self, image, boxes: np.ndarray) -> np.ndarray:
        regression, probs = self._run(self.rnet, _crops(image, boxes, 24))
        scores = probs[:, 1]
        keep = scores > STAGE_THRESHOLDS[1]
        boxes, scores, regression = boxes[keep], scores[keep], regression[keep]
        pick = nms(boxes[:, :4], scores, 0.7)
        boxes = _regress(boxes[pick, :4], regression[pick])
        return _square(np.concatenate([boxes, scores[pick, None]], axis=1))

    # stage 3: O-Net on 48x48 crops -> boxes, scores and 5 landmarks
    def _output(self, image, boxes: np.ndarray) -> RawDetections:
        regression, points, probs = self._run(self.onet, _crops(image, boxes, 48))
        scores = probs[:, 1]
        keep = scores > min(STAGE_THRESHOLDS[2], self.score_threshold)
        boxes, scores, regression, points = boxes[keep, :4], scores[keep], regression[keep], points[keep]
        widths = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        heights = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        landmarks = np.stack(
            [widths * points[:, :5] + boxes[:, :1] - 1, heights * points[:, 5:] + boxes[:, 1:2] - 1], 2
        )
        boxes = _regress(boxes, regression)
        pick = _nms_min(boxes, scores, 0.7)
        return RawDetections(boxes[pick], scores[pick], landmarks[pick])


def _crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """(K, size, size, 3) normalized crops of ``boxes`` clipped to the image (1-based, as the original MTCNN)."""
    height, width = image.shape[:2]
    crops = np.zeros((len(boxes), size, size, 3), dtype=np.float32)
    for k, (x1, y1, x2, y2) in enumerate(np.trunc(boxes[:, :4]).astype(np.int64)):
        x1, y1, x2, y2 = max(x1, 1), max(y1, 1), min(x2, width), min(y2, height)
        if x2 >= x1 and y2 >= y1:  # a box wholly outside stays black and scores low
            crops[k] = cv2.resize(image[y1 - 1 : y2, x1 - 1 : x2], (size, size), interpolation=cv2.INTER_AREA)
    return (crops - 127.5) * 0.0078125


def _grid_boxes(regression: np.ndarray, probability: np.ndarray, scale: float) -> np.ndarray:
    """P-Net map cells above threshold -> (K, 9) boxes in image pixels, score, 4 regressions."""
    stride, cell = 2, 12
    ys, xs = np.nonzero(probability >= STAGE_THRESHOLDS[0])
    corners = np.stack([xs, ys], axis=1).astype(np.float64)
    top_left = np.floor((stride * corners + 1) / scale)
    bottom_right = np.floor((stride * corners + cell) / scale)
    boxes = np.concatenate(
        [top_left, bottom_right, probability[ys, xs][:, None], regression[:, ys, xs].T.astype(np.float64)], axis=1
    )
    return boxes[nms(boxes[:, :4], boxes[:, 4], 0.5)] if len(boxes) else boxes.reshape(0, 9)


def _regress(boxes: np.ndarray, regression: np.ndarray) -> np.ndarray:
    widths = boxes[:, 2] - boxes[:, 0] + 1
    heights = boxes[:, 3] - boxes[:, 1] + 1
    return boxes[:, :4] + regression[:, :4] * np.stack([widths, heights, widths, heights], axis=1)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Boxes grown to squares around their centres (MTCNN's ``rerec``); the 5th column is kept."""
    out = boxes.copy()
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(widths, heights)
    out[:, 0] = boxes[:, 0] + widths * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + heights * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """NMS with intersection over the smaller box (MTCNN's final 'Min' pass)."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    kept = []
    while order.size:
        i, rest = order[0], order[1:]
        kept.append(i)
        iw = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]) + 1, 0, None)
        ih = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]) + 1, 0, None)
        overlap = iw * ih / np.minimum(areas[i], areas[rest])
        order = rest[overlap <= threshold]
    return np.asarray(kept, dtype=np.int64)


def _load(net, path: Path, torch):
    if not path.is_file():
        raise ModelError(f"MTCNN weight file not found: {path}; weights_dir must hold pnet.pt, rnet.pt, onet.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as exc:  # a wrong or corrupt file: report which one
        raise ModelError(f"cannot load MTCNN weights {path}: {str(exc).splitlines()[0][:200]}") from exc
    return net


def _networks(torch):
    """The three MTCNN network classes (defined lazily so importing this module does not import torch)."""
    nn = torch.nn

    class PNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
            self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
            self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
            self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
            return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)

    class RNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
            self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
            self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).reshape(x.shape[0], -1)
            x = self.prelu4(self.dense4(x))
            return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)

    class ONet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
            self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
            self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).reshape(x.shape[0], -1)
            x = self.prelu5(self.dense5(x))
            return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)

    return PNet, RNet, ONet
