"""cachedet: train detection heads on cached features of a frozen classification backbone.

The public names below load lazily (PEP 562), so ``import cachedet`` stays cheap (no torch):

- ``load(run, checkpoint="last")`` -> ``Model``; ``Model.predict(images)`` -> ``Detections``
  (``cachedet.api``).
- ``extract(ExtractConfig)`` -> ``ExtractResult`` (stage 1), ``train_heads(TrainConfig)`` ->
  ``TrainResult`` (stage 2), ``evaluate(EvalConfig)`` (or ``evaluate(run, annotations, images,
  ...)``) -> (metrics, detections) (stage 3), ``export(run, format="onnx")`` -> exported file: the front door ``cachedet.api``,
  which the CLI calls too.
- The typed configs the CLI builds: ``ExtractConfig``, ``EvalConfig``, ``AugmentConfig``, ``BackboneConfig``,
  ``TrainConfig`` (built with ``TrainConfig.of(**settings)``; sections ``SourceConfig``, ``HeadsConfig``,
  ``OptimConfig``, ``LoaderConfig``).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load": "cachedet.api",
    "Model": "cachedet.api",
    "Detections": "cachedet.api",
    "extract": "cachedet.api",
    "train_heads": "cachedet.api",
    "evaluate": "cachedet.api",
    "export": "cachedet.api",
    "ExtractConfig": "cachedet.extraction.run",
    "AugmentConfig": "cachedet.data.views",
    "BackboneConfig": "cachedet.backbones.backbone",
    "TrainConfig": "cachedet.engine.config",
    "SourceConfig": "cachedet.engine.config",
    "HeadsConfig": "cachedet.engine.config",
    "OptimConfig": "cachedet.engine.config",
    "LoaderConfig": "cachedet.engine.config",
    "EvalConfig": "cachedet.evaluation.config",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cachedet' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
