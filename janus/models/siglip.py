"""SigLIP understanding encoder: timm's VisionTransformer, no class token, no pooling head.

The official checkpoints store this tower under timm's own parameter names; its unused attention
pooling head (`attn_pool.*`) is not built here and is skipped on load.
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from .config import VisionConfig


def build_siglip(cfg: VisionConfig) -> VisionTransformer:
    """A SigLIP ViT of the given size; `forward_features(pixels)` gives [B, num_patches, width]."""
    return VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        class_token=False,
        global_pool="",
        num_classes=0,
    )
