"""VQ codes of generation images: encoded once with the frozen VQ and cached on disk.

A cache directory holds `codes.npy` ([N, num_tokens], int16 when the codebook allows) and
`index.json` (the VQ settings it was made with and the row of each image key). The key is the sha1
of an image's decoded RGB pixels, so it needs only the PIL image that a record carries, and the same
picture saved twice shares one row.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from janus.checkpoint import load_model
from janus.models.vq import VQModel
from janus.processing import load_image, preprocess_generation

from .records import read_records

CODES_FILE = "codes.npy"
INDEX_FILE = "index.json"


def image_key(image: Image.Image) -> str:
    """sha1 of the image's size and RGB pixels."""
    image = load_image(image)
    digest = hashlib.sha1(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def codebook_fingerprint(vq_model: VQModel) -> str:
    """sha1 of the codebook: a cache made with another VQ model is refused."""
    codebook = vq_model.quantize.codebook().detach().float().cpu().numpy()
    return hashlib.sha1(codebook.tobytes()).hexdigest()


def encode_images(vq_model: VQModel, images: list[Image.Image], batch_size: int = 32) -> Tensor:
    """Codes [len(images), num_tokens] (int64, on the CPU): each image short-side resized and
    centre-cropped to the VQ's size, then encoded without gradients."""
    size, device = vq_model.cfg.image_size, next(vq_model.parameters()).device
    chunks = [torch.empty(0, vq_model.cfg.num_tokens, dtype=torch.long)]
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([preprocess_generation(im, size) for im in images[start : start + batch_size]])
        with torch.no_grad():
            chunks.append(vq_model.encode(pixels.to(device)).cpu())
    return torch.cat(chunks)


class CodeCache:
    """Read-only view of a code cache directory."""

    def __init__(self, codes: np.ndarray, index: dict) -> None:
        self.codes, self.index, self.rows = codes, index, index["rows"]

    @classmethod
    def load(cls, directory: str | Path) -> "CodeCache":
        directory = Path(directory)
        index = json.loads((directory / INDEX_FILE).read_text())
        return cls(np.load(directory / CODES_FILE, mmap_mode="r"), index)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, key: str) -> Tensor | None:
        row = self.rows.get(key)
        return None if row is None else torch.from_numpy(self.codes[row].astype(np.int64))

    def check(self, vq_model: VQModel) -> None:
        """Raise if the cache was not made with this VQ model."""
        made_with = (self.index["image_size"], self.index["codebook"])
        if made_with != (vq_model.cfg.image_size, codebook_fingerprint(vq_model)):
            raise ValueError("this code cache was made with another VQ model or image size; run tokenize-images again")


def write_code_cache(
    manifest_paths: list[str | Path], vq_model: VQModel, out_dir: str | Path, batch_size: int = 32
) -> CodeCache:
    """Encode the image of every generation record (once per distinct image) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.int16 if vq_model.cfg.codebook_size <= np.iinfo(np.int16).max + 1 else np.int32
    rows: dict[str, int] = {}
    chunks = [np.empty((0, vq_model.cfg.num_tokens), dtype=dtype)]
    pending: dict[str, Image.Image] = {}

    def flush() -> None:
        chunks.append(encode_images(vq_model, list(pending.values()), batch_size).numpy().astype(dtype))
        rows.update((key, len(rows)) for key in pending)
        pending.clear()

    skipped: Counter = Counter()
    for path in manifest_paths:
        for record in read_records(path, skipped):
            if record.kind != "generation":
                continue
            key = image_key(record.images[0])
            if key not in rows:
                pending[key] = record.images[0]
            if len(pending) == batch_size:
                flush()
    flush()
    np.save(out_dir / CODES_FILE, np.concatenate(chunks))
    index = {
        "image_size": vq_model.cfg.image_size,
        "codebook": codebook_fingerprint(vq_model),
        "skipped": dict(skipped),
        "rows": rows,
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index) + "\n")
    return CodeCache.load(out_dir)


def make_image_codes_fn(vq_model: VQModel, caches: Sequence[CodeCache] = ()) -> Callable[[Image.Image], Tensor]:
    """image -> codes [num_tokens]: from the first cache that holds the image, else encoded now."""
    for cache in caches:
        cache.check(vq_model)

    def image_codes(image: Image.Image) -> Tensor:
        if caches:
            key = image_key(image)
            for cache in caches:
                codes = cache.get(key)
                if codes is not None:
                    return codes
        return encode_images(vq_model, [image])[0]

    return image_codes


def tokenize_images(
    manifests: list[str | Path], model_dir: str | Path, out_dir: str | Path, device: str = "auto"
) -> CodeCache:
    """`janus tokenize-images`: the code cache of the generation images in `manifests` (and tar shards),
    made with the VQ of the checkpoint in `model_dir`, in float32 as training's VQ runs (a cache is
    checked against that VQ's codebook; on CUDA the default dtype would be bfloat16)."""
    return write_code_cache(manifests, load_model(model_dir, device, torch.float32).vq, out_dir)
