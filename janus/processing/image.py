"""Image pre- and post-processing (DESIGN.md §3).

Resizing uses PIL's bicubic filter, which antialiases when downscaling. Output sizes use Python's
round(), as transformers' JanusImageProcessor does (the official Janus code truncates with int()).
On RGB input the result equals transformers' PIL-backend processor (`JanusImageProcessorPil`) exactly.
Its default torchvision backend resizes uint8 tensors with torch's own antialiased bicubic kernel, which
imitates PIL's but rounds differently: a few pixels differ by 1-3 uint8 levels (at most 3/127.5 = 0.024
after normalisation, mean under 1e-3; see tests/test_processing.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

BACKGROUND = (127, 127, 127)  # int(0.5 * 255) per channel: the normalisation mean, so padding maps to ~0
MIN_SIDE = 14  # the short side of a very elongated image is not resized below this (as in Janus)


def load_image(path_or_image: str | Path | Image.Image) -> Image.Image:
    """Open an image file (or take a PIL image) and return it as RGB."""
    if isinstance(path_or_image, Image.Image):
        return _to_rgb(path_or_image)
    if not isinstance(path_or_image, (str, Path)):
        raise TypeError(f"expected a path or a PIL image, got {type(path_or_image).__name__}")
    path = Path(path_or_image)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here and not later
            return _to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot decode image file {path}: {error}") from error


def preprocess_understanding(images: list[Image.Image], size: int) -> torch.Tensor:
    """Images for the SigLIP encoder: long side resized to `size`, padded to a grey square,
    normalised to [-1, 1] (mean 0.5, std 0.5). Returns float32 [B, 3, size, size]."""
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("images must be a non-empty list of PIL images")
    return torch.stack([_pixels(_pad_to_square(_resize_long_side(_check(im), size), size)) for im in images])


def preprocess_generation(image: Image.Image, size: int) -> torch.Tensor:
    """A generation training target: short side resized to `size`, centre-cropped, in [-1, 1].
    Returns float32 [3, size, size]."""
    image = _check(image)
    _check_size(size)
    scale = size / min(image.size)
    width, height = (max(size, round(side * scale)) for side in image.size)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return _pixels(image.crop((left, top, left + size, top + size)))


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """Decoded images [B, 3, H, W] in about [-1, 1] to PIL images: clip((x + 1) / 2 * 255, 0, 255) as uint8."""
    if not isinstance(pixels, torch.Tensor):
        raise TypeError(f"pixels must be a torch.Tensor, got {type(pixels).__name__}")
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must have shape [B, 3, H, W], got {list(pixels.shape)}")
    values = ((pixels.detach().float().cpu() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in values]


def _check(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if min(image.size) < 1:
        raise ValueError(f"image has an empty side: {image.size}")
    return _to_rgb(image)


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")


def _to_rgb(image: Image.Image) -> Image.Image:
    # RGBA loses its alpha channel (no compositing), as in the official Janus image loader.
    return image if image.mode == "RGB" else image.convert("RGB")


def _resize_long_side(image: Image.Image, size: int) -> Image.Image:
    _check_size(size)
    width, height = image.size
    scale = size / max(width, height)
    min_side = min(MIN_SIDE, size)
    new_size = (max(round(width * scale), min_side), max(round(height * scale), min_side))
    return image.resize(new_size, Image.Resampling.BICUBIC)


def _pad_to_square(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    canvas.paste(image, ((size - width) // 2, (size - height) // 2))
    return canvas


def _pixels(image: Image.Image) -> torch.Tensor:
    """uint8 RGB image to float32 [3, H, W] in [-1, 1]: (x / 255 - 0.5) / 0.5."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float() / 127.5 - 1.0
