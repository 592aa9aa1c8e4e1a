"""The example builder of ``conf/model/custom_vit.yaml``: its architecture lives in its defaults, so a config that
replaces ``model.builder._target_`` passes the replacement only the keys it sets itself."""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer


def example_vit(
    img_size: int = 64,
    patch_size: int = 8,
    in_chans: int = 3,
    num_classes: int = 100,
    embed_dim: int = 192,
    depth: int = 6,
    num_heads: int = 3,
) -> VisionTransformer:
    """A 6-block ViT for 64x64 RGB images and 100 classes (random init); change any argument with
    ``+model.builder.<name>=<value>``."""
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads,
    )
