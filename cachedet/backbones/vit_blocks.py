"""A plain ViT run block by block: AdaptFormer adapters on its MLPs, and hybrid caches.

Adapters (AdaptFormer, Chen et al., NeurIPS 2022, "AdaptMLP"): beside the MLP of each chosen
block, a bottleneck ``s * up(ReLU(down(h)))`` on the MLP's input ``h = norm2(x)`` (down C -> 64,
up 64 -> C, ``s = 0.1``) is added to the residual stream next to the MLP branch, after the block's
LayerScale (so a small LayerScale, as in DINOv2, does not mute it). ``up`` starts at zero, so
training starts exactly at the frozen model. Blocks: timm's ``vision_transformer.Block`` and
``eva.EvaBlock`` (pre-norm); others are a CachedetError.

Stages of a ViT are its blocks: stage k = block k, whose output is the token sequence after it.
A hybrid cache (``extract --cache-stage K``) stores block K's patch tokens as level ``b{K}``
(B, C, H, W) and, for models with prefix tokens (class, registers), those as level
``b{K}_prefix`` (B, C, 1, P); ``train-heads --adapters`` runs blocks K+1.. from them.
"""

from __future__ import annotations

import torch
from torch import nn

from cachedet.core.errors import CachedetError
from cachedet.core.structures import FeatureSpec

BOTTLENECK, SCALE = 64, 0.1


def prefix_name(block: int) -> str:
    return f"{FeatureSpec.tap_name(block)}_prefix"


class AdaptMLP(nn.Module):
    """(..., C) -> (..., C): ``scale * up(ReLU(down(h)))``, ``up`` zero-initialised."""

    def __init__(self, dim: int, bottleneck: int = BOTTLENECK, scale: float = SCALE):
        super().__init__()
        self.down, self.up, self.scale = (
            nn.Linear(dim, bottleneck),
            nn.Linear(bottleneck, dim),
            scale,
        )
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(torch.relu(self.down(h)))


class _MLPWithInput(nn.Module):
    """The block's MLP; keeps its input for the adapter that the block adds after LayerScale."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp, self.last_input = mlp, None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.last_input = h
        return self.mlp(h)


class _ResidualWithAdapter(nn.Module):
    """The block's last residual branch (``drop_path2``) plus the adapter on the MLP's input."""

    def __init__(self, drop_path: nn.Module, mlp: _MLPWithInput, adapter: AdaptMLP):
        super().__init__()
        self.drop_path, self.adapter = drop_path, adapter
        self._mlp = [mlp]  # a plain reference: the block owns the module

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        h, self._mlp[0].last_input = self._mlp[0].last_input, None
        return self.drop_path(y) + self.adapter(h)


def _check_block(block: nn.Module, k: int, name: str):
    from timm.models.eva import EvaBlock
    from timm.models.vision_transformer import Block

    if type(block) not in (Block, EvaBlock):
        raise CachedetError(
            f"source.adapt_stages {k}: block {k} of {name} is a {type(block).__name__}; adapters "
            "support timm's pre-norm ViT and EVA blocks"
        )


def add_adapters(vit: nn.Module, blocks: tuple[int, ...], name: str) -> list[nn.Parameter]:
    """Add an AdaptMLP to each of ``blocks`` of ``vit`` (timm VisionTransformer / Eva); return its parameters."""
    params = []
    for k in blocks:
        if not 0 <= k < len(vit.blocks):
            raise CachedetError(
                f"source.adapt_stages {k}: {name} runs blocks 0..{len(vit.blocks) - 1} (its deepest tap)"
            )
        block = vit.blocks[k]
        if isinstance(block.mlp, _MLPWithInput):
            continue
        _check_block(block, k, name)
        block.mlp = _MLPWithInput(block.mlp)
        adapter = AdaptMLP(vit.embed_dim)
        block.drop_path2 = _ResidualWithAdapter(block.drop_path2, block.mlp, adapter)
        params += list(adapter.parameters())
    return params


def _rope(vit: nn.Module, grid: tuple[int, int]):
    """Eva's rotary embedding for a grid (None for models without RoPE)."""
    if getattr(vit, "rope", None) is None:
        return None
    if getattr(vit, "rope_mixed", False):
        raise CachedetError("ViTs with depth-dependent (mixed) RoPE cannot run block by block here")
    return vit.rope.get_embed(shape=grid)


def _run(
    vit: nn.Module,
    x: torch.Tensor,
    first: int,
    last: int,
    grid,
    keep: set[int],
    no_grad_before: int | None,
) -> dict[int, torch.Tensor]:
    """Blocks first..last on tokens ``x``; the token sequence after each block in ``keep``."""
    rope = _rope(vit, grid)
    out = {}
    for k in range(first, last + 1):
        with torch.set_grad_enabled(
            torch.is_grad_enabled() and (no_grad_before is None or k >= no_grad_before)
        ):
            x = vit.blocks[k](x, rope=rope) if rope is not None else vit.blocks[k](x)
        if k in keep:
            out[k] = x
    return out


def _to_map(tokens: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    b, _, c = tokens.shape
    return tokens[:, prefix:].reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2).contiguous()


def _levels(
    vit: nn.Module, outs: dict[int, torch.Tensor], grid, taps: list[int], prefix_of: int | None
) -> dict:
    levels = {FeatureSpec.tap_name(k): _to_map(outs[k], vit.num_prefix_tokens, grid) for k in taps}
    if prefix_of is not None and vit.num_prefix_tokens:
        levels[prefix_name(prefix_of)] = (
            outs[prefix_of][:, : vit.num_prefix_tokens].transpose(1, 2).unsqueeze(2)
        )
    return levels


def forward_taps(
    vit: nn.Module,
    images: torch.Tensor,
    taps: list[int],
    no_grad_before: int | None = None,
    prefix_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """images (B, 3, S, S) -> {b{k}: (B, C, S/p, S/p)} for k in ``taps`` (as timm's forward_intermediates),
    plus {b{prefix_of}_prefix: (B, C, 1, P)} when asked and the model has prefix tokens."""
    x = vit.patch_embed(images)
    grid = (
        tuple(x.shape[1:3])
        if x.ndim == 4
        else tuple(vit.patch_embed.dynamic_feat_size(images.shape[-2:]))
    )
    x = vit._pos_embed(x)
    x = x[0] if isinstance(x, tuple) else x  # Eva returns (tokens, rope)
    if getattr(vit, "patch_drop", None) is not None:  # Eva has none
        x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    keep = set(taps) | ({prefix_of} if prefix_of is not None else set())
    return _levels(
        vit, _run(vit, x, 0, max(keep), grid, keep, no_grad_before), grid, taps, prefix_of
    )


def forward_from(
    vit: nn.Module, cached: dict[str, torch.Tensor], stage: int, taps: list[int]
) -> dict[str, torch.Tensor]:
    """Hybrid: blocks stage+1.. on block ``stage``'s cached tokens; cached taps (<= stage) pass through."""
    patches = cached[FeatureSpec.tap_name(stage)]
    grid = tuple(patches.shape[-2:])
    x = patches.flatten(2).transpose(1, 2)
    if vit.num_prefix_tokens:
        x = torch.cat([cached[prefix_name(stage)].squeeze(2).transpose(1, 2), x], dim=1)
    later = [k for k in taps if k > stage]
    levels = (
        _levels(vit, _run(vit, x, stage + 1, max(later), grid, set(later), None), grid, later, None)
        if later
        else {}
    )
    return {
        FeatureSpec.tap_name(k): cached[FeatureSpec.tap_name(k)]
        if k <= stage
        else levels[FeatureSpec.tap_name(k)]
        for k in taps
    }
