"""The unified Janus model: one decoder, two decoupled visual paths, two heads.

Understanding: pixels -> SigLIP -> understanding adaptor -> decoder inputs at placeholder positions.
Generation: VQ codes -> gen_embed -> generation adaptor -> decoder inputs; decoder -> image head.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adaptors import MLPAdaptor
from .attention import Documents
from .config import JanusConfig
from .decoder import Decoder
from .siglip import build_siglip
from .vq import VQModel

IGNORE = -100  # target value that takes no loss


class LossOutput(NamedTuple):
    loss: Tensor  # mean over every counted target, text and image alike
    text_loss: Tensor  # mean over text targets (0 when there are none)
    image_loss: Tensor  # mean over image-code targets (0 when there are none)
    text_count: Tensor
    image_count: Tensor


class JanusModel(nn.Module):
    def __init__(self, cfg: JanusConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.decoder.dim
        self.decoder = Decoder(cfg.decoder)
        self.vision = build_siglip(cfg.vision)
        self.und_adaptor = MLPAdaptor(cfg.vision.width, dim, dim)
        self.vq = VQModel(cfg.vq)
        self.gen_embed = nn.Embedding(cfg.vq.codebook_size, cfg.vq.codebook_dim)
        self.gen_adaptor = MLPAdaptor(cfg.vq.codebook_dim, dim, dim)
        self.gen_head = MLPAdaptor(dim, dim, cfg.vq.codebook_size)

    def encode_images(self, pixels: Tensor) -> Tensor:
        """Understanding inputs [N, num_patches, D] for preprocessed images [N, 3, S, S]."""
        expected = (3, self.cfg.vision.image_size, self.cfg.vision.image_size)
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"understanding images must have shape [N, {', '.join(map(str, expected))}], got {list(pixels.shape)}")
        features = self.vision.forward_features(pixels.to(self.und_adaptor.fc1.weight.dtype))
        return self.und_adaptor(features)

    def embed_image_codes(self, codes: Tensor) -> Tensor:
        """Decoder inputs for VQ codes (any shape) -> [..., D]."""
        return self.gen_adaptor(self.gen_embed(codes))

    def embed(
        self,
        tokens: Tensor,
        image_mask: Tensor | None = None,
        pixels: Tensor | None = None,
        code_mask: Tensor | None = None,
    ) -> Tensor:
        """Input embeddings [B, T, D] for a mixed sequence.

        tokens: [B, T] text ids, and VQ codes where `code_mask` is True. image_mask: [B, T] True at the
        understanding placeholders, filled in order with the features of `pixels` [N, 3, S, S].
        """
        text = tokens if code_mask is None else tokens.masked_fill(code_mask, 0)
        h = self.decoder.embed_tokens(text)
        if code_mask is not None and code_mask.any():
            h[code_mask] = self.embed_image_codes(tokens[code_mask]).to(h.dtype)
        if pixels is not None:
            features = self.encode_images(pixels)
            n_slots = 0 if image_mask is None else int(image_mask.sum())
            if n_slots != features.shape[0] * features.shape[1]:
                raise ValueError(
                    f"{features.shape[0]} image(s) give {features.shape[0] * features.shape[1]} features, "
                    f"but the prompt has {n_slots} image placeholder positions"
                )
            h[image_mask] = features.reshape(-1, h.shape[-1]).to(h.dtype)
        return h

    def forward(
        self,
        tokens: Tensor,
        image_mask: Tensor | None = None,
        pixels: Tensor | None = None,
        code_mask: Tensor | None = None,
        positions: Tensor | None = None,
        mask: Tensor | Documents | None = None,
    ) -> Tensor:
        """Final hidden states [B, T, D] without cache (training and scoring); heads are applied separately."""
        h = self.embed(tokens, image_mask, pixels, code_mask)
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        return self.decoder(h, positions, mask)

    def text_logits(self, hidden: Tensor) -> Tensor:
        return self.decoder.lm_head(hidden)

    def image_logits(self, hidden: Tensor) -> Tensor:
        return self.gen_head(hidden)

    def token_losses(self, hidden: Tensor, targets: Tensor, target_is_code: Tensor) -> Tensor:
        """Per-position next-token cross-entropy [B, T] in float32, 0 where the target is IGNORE.

        targets[b, t] is what position t predicts; `target_is_code` picks the image head for that
        target, the text head otherwise. Each head runs only on the positions that need it (the text
        head is large)."""
        counted = targets != IGNORE
        losses = hidden.new_zeros(targets.shape, dtype=torch.float32)
        for head, positions in ((self.text_logits, counted & ~target_is_code), (self.image_logits, counted & target_is_code)):
            if positions.any():
                logits = head(hidden[positions]).float()
                losses = losses.index_put((positions,), F.cross_entropy(logits, targets[positions], reduction="none"))
        return losses

    def loss(self, hidden: Tensor, targets: Tensor, target_is_code: Tensor) -> LossOutput:
        """Mean next-token cross-entropy over all counted targets, and over text and image targets apart."""
        losses = self.token_losses(hidden, targets, target_is_code)
        counted = targets != IGNORE
        text, image = counted & ~target_is_code, counted & target_is_code
        n_text, n_image = text.sum(), image.sum()
        return LossOutput(
            loss=losses.sum() / (n_text + n_image).clamp(min=1),
            text_loss=(losses * text).sum() / n_text.clamp(min=1),
            image_loss=(losses * image).sum() / n_image.clamp(min=1),
            text_count=n_text,
            image_count=n_image,
        )
