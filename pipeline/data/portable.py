"""The image preprocessing that travels with a registered model: decoding to 8-bit RGB and the
eval transform, in one file that imports nothing from `pipeline`.

Training (`pipeline.data`) uses these functions, and the registered model carries this very file
in its `code/` folder (MLflow `code_paths`), so a service that has only mlflow, torch and
torchvision turns image files into the model's input exactly as the study did. Keep it free of
`pipeline` imports: `tests/registry/test_portable_model.py` loads the model in a virtual
environment without the package.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2 as T

INTERPOLATIONS = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}

# an input item: a file path, encoded image bytes (or their base64 text, as JSON carries them),
# or a uint8 (H, W, 3) / (H, W) / (H, W, 4) array
Item = Any


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded PIL image -> 8-bit RGB, the same way for training and prediction.

    EXIF orientation is applied; palette and RGBA images are composited on white; grayscale,
    16-bit ('I;16', 'I') and CMYK images are converted to RGB.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 32-bit 'I' first: point() has no 16-bit big-endian ('I;16B', 16-bit TIFF) path.
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif img.mode == "F":
        img = img.convert("L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def load_rgb(source: str | os.PathLike[str] | io.IOBase) -> Image.Image:
    """Decode an image file (a path or an open binary file) fully into 8-bit RGB (`to_rgb`).

    Raises:
        OSError / PIL.UnidentifiedImageError: the file is not a decodable image.
    """
    with Image.open(source) as opened:  # type: ignore[arg-type]
        opened.load()
        return to_rgb(opened)


def finishing(mean: Sequence[float], std: Sequence[float]) -> list[Callable[[Any], Any]]:
    """PIL or uint8 `(3, H, W)` -> float32 in [0, 1], then normalised by the ImageNet-style mean/std."""
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]


def eval_transform(
    resize: int, crop: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bilinear"
) -> T.Compose:
    """PIL RGB -> `(3, crop, crop)` float32 normalised tensor: resize the short side to `resize`
    px (antialiased), centre-crop `crop` px (the torchvision reference eval recipe)."""
    return T.Compose(
        [
            T.Resize(resize, interpolation=INTERPOLATIONS[interpolation], antialias=True),
            T.CenterCrop(crop),
            *finishing(mean, std),
        ]
    )


def open_item(item: Item) -> Image.Image:
    """One input item -> 8-bit RGB.

    A `str`/path names a file; a `str` that is no file is read as base64 image bytes (what a JSON
    request carries); bytes are an encoded image; an array is uint8 pixels, `(H, W, 3)` RGB,
    `(H, W, 4)` RGBA or `(H, W)` grayscale.

    Raises:
        ValueError: the item is none of these (the message says what it is).
        OSError / PIL.UnidentifiedImageError: the file or bytes do not decode as an image.
    """
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(item))
    if isinstance(item, np.ndarray):
        return _from_array(item)
    if isinstance(item, os.PathLike):
        return load_rgb(item)
    if isinstance(item, str):
        if os.path.isfile(item):
            return load_rgb(item)
        return _from_bytes(_base64_image(item))
    raise ValueError(f"expected an image file path, encoded image bytes or a uint8 array, got {type(item).__name__}")


def _from_bytes(data: bytes) -> Image.Image:
    try:
        return load_rgb(io.BytesIO(data))
    except UnidentifiedImageError:  # its message names a BytesIO object, not the input
        raise ValueError("not an image file") from None


def _base64_image(text: str) -> bytes:
    payload = text.split(",", 1)[1] if text.startswith("data:") else text  # a data: URI
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("no such file, and not base64 image bytes") from None


def _from_array(pixels: np.ndarray) -> Image.Image:
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
        raise ValueError(
            f"an image array must be uint8 (H, W, 3), (H, W, 4) or (H, W); got {pixels.dtype} {tuple(pixels.shape)}"
        )
    return to_rgb(Image.fromarray(pixels))


def describe(item: Item) -> str:
    """A short name for an input item in an error row: the path, or the kind and size."""
    if isinstance(item, (str, os.PathLike)) and os.path.isfile(item):
        return os.fsdecode(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<{len(bytes(item))} bytes>"
    if isinstance(item, np.ndarray):
        return f"<array {item.dtype} {tuple(item.shape)}>"
    text = str(Path(item)) if isinstance(item, os.PathLike) else str(item)
    return text if len(text) <= 80 else text[:77] + "..."
