"""Typed neck and head configurations: every detector option's default lives here, once.

``DetectorConfig.options`` (the flat dict that runs store in ``config.json`` and checkpoints)
becomes one of these frozen dataclasses through ``from_options``; option names map onto fields
by each class's ``OPTIONS`` table. A head config declares what it needs from the neck
(``extra_levels``: "maxpool" adds P6 by max-pooling, "p6p7" adds P6 and P7 by strided convs on
the coarsest level) and whether it can carry a mask branch (``supports_masks``).
``cachedet.models.build`` maps names to these configs and their builders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from cachedet.core.errors import CachedetError

DEFAULT_IOUS = (0.5, 0.6, 0.7)
MASKS_NEED_ROIS = (
    "detector.masks: the retinanet head has no RoIs for a mask branch; "
    "use detector.head faster-rcnn or cascade"
)


class FromOptions:
    """``from_options(options, **fields)``: the fields named in ``OPTIONS`` taken from ``options``,
    coerced to the type of their default (int, or a tuple of floats); absent options keep the default."""

    OPTIONS: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_options(cls, options: dict, **fields):
        for option, name in cls.OPTIONS.items():
            if option in options:
                default = cls.__dataclass_fields__[name].default
                value = options[option]
                tuple_field = isinstance(default, tuple)
                fields[name] = (
                    tuple(float(v) for v in value) if tuple_field else type(default)(value)
                )
        return cls(**fields)


@dataclass(frozen=True)
class FPNConfig(FromOptions):
    """torchvision's FeaturePyramidNetwork over the backbone levels, ``channels`` wide."""

    channels: int = 256


@dataclass(frozen=True)
class SimplePyramidConfig(FromOptions):
    """ViTDet's simple feature pyramid from single-stride taps, ``channels`` wide."""

    channels: int = 256


@dataclass(frozen=True)
class NASFPNConfig(FromOptions):
    """NAS-FPN: ``repeats`` stacks of the published merging cells over P3-P7."""

    OPTIONS: ClassVar[dict[str, str]] = {"nasfpn_repeats": "repeats"}
    channels: int = 256
    repeats: int = 5

    def __post_init__(self):
        if self.repeats < 1:
            raise CachedetError(
                f"detector.options.nasfpn_repeats: expected a positive integer, got {self.repeats}"
            )


@dataclass(frozen=True)
class MaskConfig(FromOptions):
    """Mask R-CNN's mask head: ``convs`` 3x3 convs of ``channels`` on 14x14 RoIs, 28x28 masks."""

    OPTIONS: ClassVar[dict[str, str]] = {"mask_convs": "convs", "mask_channels": "channels"}
    convs: int = 4
    channels: int = 256


RCNN_OPTIONS = {
    "box_convs": "box_convs",
    "box_fcs": "box_fcs",
    "box_representation": "box_representation",
    "rois_per_image": "rois_per_image",
    "proposals_per_image": "proposals_per_image",
}


@dataclass(frozen=True)
class FasterRCNNConfig(FromOptions):
    """RPN (``proposals_per_image`` kept after NMS) + one box stage: ``box_convs`` 3x3 conv+BN layers
    as wide as the neck, then ``box_fcs`` FC layers of ``box_representation`` (4conv1fc), trained on
    ``rois_per_image`` sampled RoIs; ``mask`` adds Mask R-CNN's mask branch."""

    OPTIONS: ClassVar[dict[str, str]] = RCNN_OPTIONS
    extra_levels: ClassVar[str] = "maxpool"
    supports_masks: ClassVar[bool] = True
    box_convs: int = 4
    box_fcs: int = 1
    box_representation: int = 1024
    rois_per_image: int = 512
    proposals_per_image: int = 1000
    mask: MaskConfig | None = None


@dataclass(frozen=True)
class CascadeConfig(FasterRCNNConfig):
    """Cascade R-CNN: one box stage per IoU threshold in ``ious`` (0.5, 0.6, 0.7), each with the
    box head above (0 convs, 2 FC layers by default, as the paper's cascade configs)."""

    OPTIONS: ClassVar[dict[str, str]] = {**RCNN_OPTIONS, "cascade_ious": "ious"}
    box_convs: int = 0
    box_fcs: int = 2
    ious: tuple[float, ...] = DEFAULT_IOUS

    def __post_init__(self):
        if not self.ious or any(not 0 < v < 1 for v in self.ious):
            raise CachedetError(
                f"detector.options.cascade_ious {list(self.ious)}: expected thresholds between 0 and 1"
            )


@dataclass(frozen=True)
class RetinaNetConfig(FromOptions):
    """RetinaNet: torchvision's RetinaNetHead (focal loss) on P3-P7; no RoIs, so no mask branch."""

    extra_levels: ClassVar[str] = "p6p7"
    supports_masks: ClassVar[bool] = False
