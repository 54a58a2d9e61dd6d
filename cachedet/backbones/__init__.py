"""Frozen backbones: timm models with declared feature levels (``backbone``), plain ViTs and their
simple-pyramid taps (``vit``, ``vit_blocks``) and trainable adapters (``adapters``).

The names below are the ones most callers need (``from cachedet.backbones.backbone import BackboneConfig``)."""

from cachedet.backbones.backbone import Backbone, BackboneConfig, build_backbone

__all__ = ["Backbone", "BackboneConfig", "build_backbone"]
