"""Face mask geometry (largest face, 3× box, clipping, no face) and the detectors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from avatar.io.errors import InputError
from avatar.models.face import FaceDetector, _nms, face_box, face_mask

ROOT = Path(__file__).resolve().parents[2]


def test_box_is_scaled_three_times_around_its_centre():
    assert face_box((640, 480), [(300.0, 200.0, 340.0, 260.0)]) == (260, 140, 380, 320)


def test_box_is_clipped_to_the_image():
    assert face_box((200, 100), [(10.0, 10.0, 60.0, 50.0)]) == (0, 0, 110, 90)


def test_largest_face_is_picked_not_the_last_larger_than_the_first():
    small, large, medium = (0.0, 0.0, 10.0, 10.0), (100.0, 100.0, 160.0, 160.0), (300.0, 300.0, 320.0, 320.0)
    # The official pick would keep `medium` (the last face larger than the first one).
    assert face_box((400, 400), [small, large, medium], area=1.0) == (100, 100, 160, 160)


def test_no_face_gives_the_whole_image():
    mask = face_mask((96, 64), [], (8, 12))
    assert mask.shape == (1, 1, 1, 8, 12)
    assert torch.equal(mask, torch.ones(1, 1, 1, 8, 12))


def test_mask_is_the_box_at_latent_resolution():
    # 128×64 image, face 16×16 at (56, 24): box 48×48 at (40, 8)..(88, 56) → latent (÷8) cols 5..11, rows 1..7
    mask = face_mask((128, 64), [(56.0, 24.0, 72.0, 40.0)], (8, 16))
    assert mask.shape == (1, 1, 1, 8, 16)
    expected = torch.zeros(8, 16)
    expected[1:7, 5:11] = 1.0
    assert torch.equal(mask[0, 0, 0], expected)


def test_nms_drops_overlaps_and_keeps_the_best():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.tensor([0.6, 0.9, 0.7])
    assert _nms(boxes, scores, 0.45) == [1, 2]


def test_official_detector_without_its_file_says_so(tmp_path):
    with pytest.raises(InputError, match="detface.pt"):
        FaceDetector("official", tmp_path / "det_align" / "detface.pt")
    with pytest.raises(InputError, match="face_detector"):
        FaceDetector("mtcnn")


def test_opencv_detector_finds_the_portrait_face():
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "CascadeClassifier"):
        pytest.skip(f"OpenCV {cv2.__version__} ships no Haar cascades (needs opencv-python-headless 4.x)")
    image = Image.open(ROOT / "examples" / "portrait.jpg")
    boxes = FaceDetector("opencv").detect(image)
    assert boxes, "no face found in examples/portrait.jpg"
    x1, y1, x2, y2 = boxes[0]
    width, height = image.size
    assert 0.08 * width < x2 - x1 < 0.8 * width and 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    mask = face_mask(image.size, boxes, (height // 8, width // 8))
    assert 0.0 < mask.mean() < 1.0
