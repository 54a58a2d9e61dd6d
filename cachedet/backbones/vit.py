"""Plain ViT backbones in timm: which models they are, their taps, canvas rule and blocks.

"Plain ViT" means timm's ``VisionTransformer``, ``Eva`` and DeiT families (modules
``vision_transformer``, ``eva``, ``deit``): ``vit_*`` incl. ``*_dinov2*`` / ``*_reg4_*``, CLIP,
SigLIP, ``*_dinov3*`` and ``eva02_*``. Every tap of such a model has one stride, its patch size.
timm builds them ``features_only`` as a ``FeatureGetterNet`` over ``forward_intermediates``: tap
``i`` is block ``i``'s output tokens, prefix tokens (class, registers) dropped, reshaped to
(B, C, S/p, S/p), without the final norm; blocks after the deepest tap are pruned.

Taps (``--taps``, timm's ``out_indices``) are 0-based block indices; negative ones count from the
end. Default: the last block only, as ViTDet (Li et al., ECCV 2022) builds its pyramid from it.
Level names come from the taps (``b11``), so several taps at one stride never collide.

Canvas: a multiple of the patch size. Position embeddings follow the canvas through timm's own
``dynamic_img_size=True`` (absolute embeddings resampled with ``resample_abs_pos_embed``, RoPE
grids recomputed), so one set of weights (one ``weights_sha256``) serves every canvas.
"""

from __future__ import annotations

import timm
from torch import nn

from cachedet.core.errors import CachedetError
from cachedet.core.structures import FeatureSpec

VIT_MODULES = ("timm.models.vision_transformer", "timm.models.eva", "timm.models.deit")
DEFAULT_TAPS = (-1,)  # the last block


def is_vit(name: str) -> bool:
    """True for a timm model name of the plain-ViT families above (no model is built)."""
    try:
        return (
            timm.models.model_entrypoint(timm.models.split_model_name_tag(name)[0]).__module__
            in VIT_MODULES
        )
    except RuntimeError:  # unknown name
        return False


def create_kwargs(name: str) -> dict:
    """Extra ``timm.create_model`` arguments for ``name``: position embeddings that follow the canvas."""
    return {"dynamic_img_size": True} if is_vit(name) else {}


def inner(model: nn.Module) -> nn.Module:
    """The ViT inside timm's FeatureGetterNet wrapper."""
    return model.model


def check_taps(name: str, taps: tuple[int, ...] | None, n_blocks: int) -> tuple[int, ...]:
    """Absolute, sorted, distinct block indices; CachedetError naming --taps when out of range."""
    taps = DEFAULT_TAPS if taps is None else tuple(taps)
    if not taps:
        raise CachedetError(
            f"backbone.out_indices: give at least one block of {name} (0..{n_blocks - 1})"
        )
    bad = [t for t in taps if not -n_blocks <= t < n_blocks]
    if bad:
        raise CachedetError(
            f"backbone.out_indices {','.join(map(str, taps))}: {name} has blocks 0..{n_blocks - 1} (or -1..-{n_blocks})"
        )
    return tuple(sorted({t % n_blocks for t in taps}))


def tap_specs(model: nn.Module) -> list[FeatureSpec]:
    """One spec per tap: name ``b{block}``, channels and stride as timm's feature_info declares them."""
    info = model.feature_info
    return [
        FeatureSpec(FeatureSpec.tap_name(int(i)), int(c), int(r))
        for i, c, r in zip(model.out_indices, info.channels(), info.reduction())
    ]


def patch_size(model: nn.Module) -> int:
    p = inner(model).patch_embed.patch_size
    p = tuple(p) if isinstance(p, (tuple, list)) else (p, p)
    if p[0] != p[1]:
        raise CachedetError(f"non-square patches {p} are not supported")
    return int(p[0])


def check_canvas(name: str, patch: int, size: int, option: str = "augment.size"):
    """A one-line CachedetError unless ``size`` is a multiple of the patch size."""
    if size % patch:
        lower, upper = size // patch * patch, -(-size // patch) * patch
        raise CachedetError(
            f"{option} {size}: {name} cuts the canvas into {patch}x{patch} patches; "
            f"use a multiple of {patch} (e.g. {lower or upper} or {upper})"
        )
