"""Reference image: load (any mode, EXIF orientation) and the official resolution bucketing.

The bucket rule follows the official ``VideoAudioTextLoaderVal.get_batch_data``: scale the short side to
``image_size``, round each side to a multiple of 64 (Python ``round``), and if the area exceeds
``image_size × long_cap`` rescale to that area from the original size and round again; the image is then resized
with LANCZOS (no crop). ``resize_to_bucket(..., crop=True)`` offers an aspect-preserving cover resize + centre crop.

``check_geometry`` is the sense check at validation: the bucket rule keeps an image's shape, so an extreme aspect ratio
(a 64×4000 strip becomes a 128×7296 video at 704) is refused beyond ``MAX_ASPECT_RATIO`` (4:1, wider than 32:9),
naming the size, its ratio and the bucket it would get.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from avatar.io.errors import InputError
from avatar.io.paths import check_input_file

#: Smallest accepted side of the reference image, in pixels.
MIN_SIDE = 64

#: Official long-side caps per image_size (area cap = image_size × long_cap); other sizes use 1.5 × image_size.
LONG_CAPS = {704: 1216, 512: 768, 384: 576, 256: 384}

#: Widest accepted aspect ratio (long side / short side) of the reference image.
MAX_ASPECT_RATIO = 4.0

#: Background that transparent pixels are composited onto.
BACKGROUND = (255, 255, 255)


def long_cap(image_size: int) -> int:
    return LONG_CAPS.get(int(image_size), int(round(1.5 * image_size)))


def _to_rgb(image: Image.Image, path: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode.startswith("I") or mode == "F":
        # 16/32-bit integer or float greyscale: scale to 8 bit instead of clipping (convert("RGB") would clip).
        arr = np.asarray(image, dtype=np.float64)
        if mode == "F":
            peak = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0
        elif mode.startswith("I;16") or (arr.size and arr.max() > 255):
            peak = 65535.0
        else:
            peak = 255.0
        arr = np.nan_to_num(arr, nan=0.0) * (255.0 / peak)
        grey = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise InputError(
            f"image={path}: colour mode {mode!r} cannot be converted to RGB ({err}); save it as an RGB PNG or JPEG"
        ) from err


def load_image(path) -> Image.Image:
    """Open ``path`` as an RGB PIL image with its EXIF orientation applied. Raises InputError naming the file."""
    path = os.fspath(path)
    check_input_file(path, "image", "a PNG or JPEG reference image")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            if image is opened:
                image = opened.copy()
    except Image.DecompressionBombError as err:
        raise InputError(f"image={path}: image is too large to decode safely ({err})") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise InputError(
            f"image={path}: not a readable image or the file is corrupt ({type(err).__name__}: {err}); "
            "give a PNG, JPEG or WebP file"
        ) from err
    image = _to_rgb(image, path)
    width, height = image.size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise InputError(f"image={path}: {width}x{height} px is too small; the minimum is {MIN_SIDE} px on each side")
    return image


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def bucket_size(width: int, height: int, image_size: int, multiple: int = 64) -> tuple[int, int]:
    """Rendered (width, height) for an input of ``width × height`` (the official rule, generalised to any
    ``image_size`` and ``multiple``). 704: 1280×720 → (1216, 704), a square → (704, 704)."""
    if width <= 0 or height <= 0:
        raise InputError(f"image size {width}x{height} is invalid; both sides must be positive")
    if image_size <= 0 or multiple <= 0:
        raise InputError(
            f"model.image_size={image_size} / model.bucket_multiple={multiple} are invalid; both must be positive"
        )
    scale = image_size / min(width, height)
    new_w = _round_to(width * scale, multiple)
    new_h = _round_to(height * scale, multiple)
    area_cap = image_size * long_cap(image_size)
    if new_w * new_h > area_cap:
        scale = math.sqrt(area_cap / width / height)
        new_w = _round_to(width * scale, multiple)
        new_h = _round_to(height * scale, multiple)
    return new_w, new_h


def check_geometry(path, width: int, height: int, image_size: int, multiple: int) -> tuple[int, int]:
    """The image's bucket (``bucket_size``), or InputError when its aspect ratio exceeds ``MAX_ASPECT_RATIO``."""
    bucket = bucket_size(width, height, image_size, multiple)
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"image={path}: {width}x{height} px is {ratio:.1f}:1, beyond the {MAX_ASPECT_RATIO:g}:1 the model renders "
            f"(model.image_size={image_size} would make it a {bucket[0]}x{bucket[1]} video); crop it to at most "
            f"{MAX_ASPECT_RATIO:g}:1 around the face"
        )
    return bucket


def resize_to_bucket(image: Image.Image, size: tuple[int, int], crop: bool = False) -> Image.Image:
    """Resize ``image`` to ``size`` = (width, height) with LANCZOS.

    ``crop=False`` (default) is the official behaviour: a plain resize (the bucket keeps the aspect ratio to within
    the 64-px rounding, so the distortion is a few per cent at most). ``crop=True`` scales to cover ``size`` keeping
    the aspect ratio, then centre-crops."""
    width, height = int(size[0]), int(size[1])
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size == (width, height):
        return image.copy()
    if not crop:
        return image.resize((width, height), Image.LANCZOS)
    scale = max(width / image.width, height / image.height)
    cover = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(cover, Image.LANCZOS)
    left = (cover[0] - width) // 2
    top = (cover[1] - height) // 2
    return resized.crop((left, top, left + width, top + height))
