"""LlamaGen VQ-16 image tokenizer: conv encoder -> L2-normalised codebook lookup -> conv decoder.

Module and parameter names are the official LlamaGen / Janus ones, so an official `gen_vision_model.*`
state dict loads with only that prefix stripped. See DESIGN.md §5.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from janus.models.config import VQConfig


class VQOutput(NamedTuple):
    reconstruction: Tensor  # [B, 3, H, W]
    codebook_loss: Tensor  # mean((zq - sg(z))^2): moves the codebook towards the encoder
    commitment_loss: Tensor  # beta * mean((sg(zq) - z)^2): keeps the encoder near its codes
    codes: Tensor  # [B, num_tokens], row-major over the latent grid


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # Identity has no parameters, so the state dict only has `nin_shortcut` where channels change.
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B, C, H, W] -> [B, 1 head, HW, C]; SDPA's default scale 1/sqrt(C) is the reference's.
        q, k, v = (proj(y).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding: right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: res blocks (each followed by attention if `attn`), then optional resampling."""

    def __init__(
        self, c_in: int, c_out: int, num_res: int, attn: bool, downsample: bool = False, upsample: bool = False
    ):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c_in if i == 0 else c_out, c_out) for i in range(num_res))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(num_res if attn else 0))
        self.downsample = Downsample(c_out) if downsample else None
        self.upsample = Upsample(c_out) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for i, res in enumerate(self.res):
            x = res(x)
            if self.attn:
                x = self.attn[i](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


def mid_block(channels: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(channels, channels), AttnBlock(channels), ResBlock(channels, channels))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(3, cfg.base_channels, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            Level(c_in, c_out, cfg.num_res_blocks, attn=i == last, downsample=i != last)
            for i, (c_in, c_out) in enumerate(zip([cfg.base_channels] + widths[:-1], widths))
        )
        self.mid = mid_block(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.conv_blocks:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Mirror of the encoder with one more res block per level; conv_blocks[0] is the lowest resolution."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in reversed(cfg.channel_mult)]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        self.mid = mid_block(widths[0])
        self.conv_blocks = nn.ModuleList(
            Level(c_in, c_out, cfg.num_res_blocks + 1, attn=i == 0, upsample=i != last)
            for i, (c_in, c_out) in enumerate(zip(widths[:1] + widths[:-1], widths))
        )
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))
        for level in self.conv_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Quantizer(nn.Module):
    """Nearest-neighbour codebook with L2-normalised latents and entries (LlamaGen's `l2_norm=True`).

    transformers' JanusVQVAEVectorQuantizer.forward searches on raw latents and codebook (only its
    `get_codebook_entry` normalises); we follow LlamaGen/Janus, which normalise both in both places.
    """

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)

    def codebook(self) -> Tensor:
        return F.normalize(self.embedding.weight, dim=-1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [B, D, h, w] -> (unit-norm z [B, h, w, D], codes [B, h, w])."""
        z = F.normalize(z.permute(0, 2, 3, 1), dim=-1)
        # Between unit vectors |z - e|^2 = 2 - 2 z.e, so the nearest entry has the largest dot product.
        # Scored in float32 (also under autocast) so low-precision weights do not flip near-ties.
        with torch.autocast(z.device.type, enabled=False):
            codes = (z.float() @ self.codebook().float().T).argmax(dim=-1)
        return z, codes

    def lookup(self, codes: Tensor) -> Tensor:
        """codes [...] -> unit-norm entries [..., D]."""
        return F.embedding(codes, self.codebook())


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.quantize = Quantizer(cfg.codebook_size, cfg.codebook_dim)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def _latents(self, pixels: Tensor) -> Tensor:
        """Pre-quantisation latents [B, codebook_dim, grid, grid]."""
        size = self.cfg.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"expected pixels of shape [B, 3, {size}, {size}], got {list(pixels.shape)}")
        return self.quant_conv(self.encoder(pixels.to(self.quant_conv.weight.dtype)))

    def _decode_grid(self, zq: Tensor) -> Tensor:
        """Quantised latents [B, grid, grid, D] -> pixels [B, 3, H, W]."""
        # contiguous NCHW: a permuted view would propagate channels-last layout through the whole decoder
        return self.decoder(self.post_quant_conv(zq.permute(0, 3, 1, 2).contiguous()))

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> codes [B, num_tokens] (int64, row-major grid)."""
        _, codes = self.quantize(self._latents(pixels))
        return codes.flatten(1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, num_tokens] -> pixels [B, 3, H, W], roughly in [-1, 1] (not clamped)."""
        n, size = self.cfg.num_tokens, self.cfg.codebook_size
        if codes.ndim != 2 or codes.shape[1] != n:
            raise ValueError(f"expected codes of shape [B, {n}], got {list(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"expected integer codes, got dtype {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= size):
            raise ValueError(
                f"codes must lie in [0, {size}), got values in [{codes.min().item()}, {codes.max().item()}]"
            )
        g = self.cfg.grid_size
        return self._decode_grid(self.quantize.lookup(codes.long()).view(codes.shape[0], g, g, -1))

    def forward(self, pixels: Tensor) -> VQOutput:
        """Training pass: reconstruction through the straight-through estimator, plus LlamaGen's VQ losses."""
        z, codes = self.quantize(self._latents(pixels))
        zq = self.quantize.lookup(codes)
        codebook_loss = F.mse_loss(zq, z.detach())
        commitment_loss = self.cfg.commit_beta * F.mse_loss(z, zq.detach())
        zq = z + (zq - z).detach()  # straight-through: forward uses zq, gradients flow to z unchanged
        return VQOutput(self._decode_grid(zq), codebook_loss, commitment_loss, codes.flatten(1))
