"""Face detection on the reference image and the face mask of the audio adapters (§3.3 item 5, §10 of the dossier).

Two detectors: ``official`` (the TorchScript YOLO-style ``det_align/detface.pt``: short side 416, sides rounded up to
multiples of 32, confidence 0.5, NMS IoU 0.45) and ``opencv`` (OpenCV's bundled Haar frontal-face cascade, used by
the tiny model and wherever the official file is absent). Boxes are ``(x1, y1, x2, y2)`` in image pixels.

Deliberate difference: the official "largest face" pick never updates its running maximum, so the last face larger
than the first one wins. We take the largest face.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from avatar.io.errors import InputError

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]

OFFICIAL_INPUT_SIDE = 416
OFFICIAL_STRIDES = (8, 16, 32)
HAAR_CASCADE = "haarcascade_frontalface_default.xml"


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression; indices of the kept boxes, best score first."""
    order = scores.argsort(descending=True).tolist()
    areas = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    keep = []
    while order:
        best = order.pop(0)
        keep.append(best)
        if not order:
            break
        rest = torch.tensor(order)
        top_left = torch.maximum(boxes[best, :2], boxes[rest, :2])
        bottom_right = torch.minimum(boxes[best, 2:], boxes[rest, 2:])
        inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
        iou = inter / (areas[best] + areas[rest] - inter)
        order = [i for i, overlap in zip(order, iou.tolist()) if overlap <= iou_threshold]
    return keep


def load_detector(path: str | Path, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """The official TorchScript detector (``det_align/detface.pt``); a truncated or corrupt file raises a one-line
    ``BadCheckpoint``."""
    from avatar.weights.files import BadCheckpoint, check_torch_file

    check_torch_file(path)
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError, OSError):
        raise BadCheckpoint(
            f"{path} is not a loadable TorchScript face detector (truncated or corrupt); re-download it"
        ) from None


class FaceDetector:
    """``detect(image) -> list[Box]`` with the ``official`` TorchScript detector or OpenCV's Haar cascade."""

    def __init__(
        self,
        backend: str = "official",
        detector_path: str | Path | None = None,
        device: torch.device | str = "cpu",
        conf_threshold: float = 0.5,
        iou_threshold: float = 0.45,
    ):
        self.backend = backend
        self.device = torch.device(device)
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        if backend == "official":
            if detector_path is None or not Path(detector_path).is_file():
                raise InputError(
                    f"face detector: {detector_path} not found; download det_align/detface.pt with the official "
                    "weights or set model.face_detector=opencv"
                )
            self.model = load_detector(detector_path, self.device)
        elif backend == "opencv":
            import cv2

            if not hasattr(cv2, "CascadeClassifier"):
                raise InputError(
                    f"model.face_detector=opencv: OpenCV {cv2.__version__} has no Haar cascades (removed in 5.x); "
                    "install opencv-python-headless 4.x"
                )
            self.cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / HAAR_CASCADE))
            if self.cascade.empty():
                raise InputError(f"model.face_detector=opencv: {HAAR_CASCADE} is missing from OpenCV's data folder")
        else:
            raise InputError(f"model.face_detector={backend!r}: valid values are 'official' and 'opencv'")

    def detect(self, image) -> list[Box]:
        """Faces in a PIL RGB image, best score first."""
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return self._detect_official(rgb) if self.backend == "official" else self._detect_opencv(rgb)

    def _detect_opencv(self, rgb: np.ndarray) -> list[Box]:
        import cv2

        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        min_side = max(24, min(gray.shape) // 10)
        found = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
        boxes = [(float(x), float(y), float(x + w), float(y + h)) for x, y, w, h in found]
        return sorted(boxes, key=_area, reverse=True)

    @torch.no_grad()
    def _detect_official(self, rgb: np.ndarray) -> list[Box]:
        import cv2

        h0, w0 = rgb.shape[:2]
        ratio = OFFICIAL_INPUT_SIDE / min(h0, w0)
        h1 = int(h0 * ratio + 31) // 32 * 32
        w1 = int(w0 * ratio + 31) // 32 * 32
        resized = cv2.resize(rgb, (w1, h1), interpolation=cv2.INTER_LINEAR)
        pixels = torch.from_numpy(resized).to(self.device).permute(2, 0, 1)[None].float() / 255
        grids = []
        for stride in OFFICIAL_STRIDES:
            ys, xs = torch.meshgrid(torch.arange(h1 // stride), torch.arange(w1 // stride), indexing="ij")
            grids.append(torch.stack((xs, ys), 2).view(1, 1, h1 // stride, w1 // stride, 2).float().to(self.device))
        # [1, N, 16]: centre x, centre y, w, h, objectness, 5 landmarks (x, y), class score.
        pred = self.model(pixels, grids)[0].float().cpu()
        pred = pred[pred[:, 4] > self.conf_threshold]
        scores = pred[:, 4] * pred[:, 15]
        pred, scores = pred[scores > self.conf_threshold], scores[scores > self.conf_threshold]
        if len(pred) == 0:
            return []
        centre, size = pred[:, :2], pred[:, 2:4]
        boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
        keep = _nms(boxes, scores, self.iou_threshold)
        scale = torch.tensor([w0 / w1, h0 / h1, w0 / w1, h0 / h1])
        return [tuple(float(v) for v in boxes[i] * scale) for i in keep]


def _area(box: Box) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def face_box(image_size: tuple[int, int], boxes: list[Box], area: float = 3.0) -> tuple[int, int, int, int]:
    """The mask box in pixels: the largest face scaled ``area`` times in width and height around its centre, clipped
    to the image (official rounding: truncation to whole pixels). No face: the whole image."""
    width, height = image_size
    if not boxes:
        return 0, 0, width, height
    x1, y1, x2, y2 = max(boxes, key=_area)
    centre_x, centre_y = (x1 + x2) / 2, (y1 + y2) / 2
    half_w, half_h = (x2 - x1) * area / 2, (y2 - y1) * area / 2
    return (
        int(max(centre_x - half_w, 0)),
        int(max(centre_y - half_h, 0)),
        int(min(centre_x + half_w, width)),
        int(min(centre_y + half_h, height)),
    )


def face_mask(
    image_size: tuple[int, int], boxes: list[Box], latent_hw: tuple[int, int], area: float = 3.0
) -> torch.Tensor:
    """``[1, 1, 1, h_lat, w_lat]`` float mask: 1 inside ``face_box`` at pixel resolution, bilinear-resized."""
    width, height = image_size
    x1, y1, x2, y2 = face_box(image_size, boxes, area)
    mask = torch.zeros(1, 1, height, width)
    mask[:, :, y1:y2, x1:x2] = 1.0
    mask = F.interpolate(mask, size=tuple(latent_hw), mode="bilinear", align_corners=False)
    return mask[:, :, None]
