"""A fixed linear projection of each backbone level onto its leading principal directions (PCA).

Every neck in cachedet starts a level with a linear map of its channels (the 1x1 lateral
convolutions of FPN and NAS-FPN, the simple pyramid's first convolution), which can use at most
``neck channels`` directions of the backbone's C channels. Projecting a level onto its k leading
principal directions (k <= C), fitted once per store on a seeded sample of views, keeps what such
a map can use best and drops the rest: a store holds k channels instead of C. With k = C the
projection is a rotation (plus a shift): a neck can undo it exactly.

``y = components @ (x - mean)`` at every position: features (B, C, H, W) -> (B, k, H, W), in
float32, as a 1x1 convolution. Levels with k = C are not projected (stored as the backbone gives
them). The statistics are accumulated in float64 (``ProjectionFit``) and decomposed with
``torch.linalg.eigh``; each component's sign is fixed (its largest-magnitude entry positive), so the
same inputs give the same bytes.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cachedet.cache import schema
from cachedet.cache.header import FINGERPRINT_BACKBONE_KEYS, differences
from cachedet.cache.store import StoreIndex
from cachedet.core.errors import CachedetError
from cachedet.core.structures import FeatureSpec

AUTO_WIDTH = 256  # ``auto`` keeps min(C, this) directions: the default neck width
SAMPLE_VIEWS = 256  # views the fit sees (spread over the whole store, seeded)
POSITIONS_PER_VIEW = 4096  # feature positions per view and level the fit keeps at most


def parse_request(value) -> str | int | float | dict | None:
    """A projection request in its normal form, from the config field or the CLI's text.

    ``None``/``"none"``: no projection; ``"auto"``: min(C, 256) per level; an integer K >= 1:
    min(C, K) per level; a fraction in (0, 1) (``0.25`` or ``"1/4"``): that share of each level's
    channels (at least 1); ``{"c5": 256}`` or ``"c4=128,c5=256"``: per level (others unprojected).
    Raises CachedetError naming ``ExtractConfig.project`` for anything else.
    """
    bad = CachedetError(
        f"ExtractConfig.project {value!r}: expected auto, none, a channel count K >= 1, a fraction "
        "in (0, 1) such as 1/4, or per level such as c4=128,c5=256"
    )
    if value is None or isinstance(value, bool):
        if value is None:
            return None
        raise bad
    if isinstance(value, dict):
        if not value or not all(isinstance(k, int) and k >= 1 for k in value.values()):
            raise bad
        return {str(k): int(v) for k, v in sorted(value.items())}
    if isinstance(value, int):
        if value < 1:
            raise bad
        return value
    if isinstance(value, float):
        if not 0 < value < 1:
            raise bad
        return value
    text = str(value).strip().lower()
    if text in ("none", ""):
        return None
    if text == "auto":
        return "auto"
    try:
        if "=" in text:
            pairs = (item.split("=") for item in text.split(","))
            return parse_request({name.strip(): int(k) for name, k in pairs})
        if "/" in text:
            num, den = text.split("/")
            return parse_request(int(num) / int(den))
        return parse_request(float(text) if "." in text else int(text))
    except (ValueError, ZeroDivisionError):
        raise bad from None


def kept_channels(request, specs: list[FeatureSpec]) -> dict[str, int]:
    """Directions kept per level for a normal-form ``request`` (``parse_request``): {level: k},
    k <= C. Raises CachedetError for a per-level request naming a level the backbone lacks."""
    if request is None:
        return {s.name: s.channels for s in specs}
    if isinstance(request, dict):
        unknown = sorted(set(request) - {s.name for s in specs})
        if unknown:
            raise CachedetError(
                f"ExtractConfig.project: no level {unknown[0]} in this backbone (levels "
                f"{', '.join(s.name for s in specs)})"
            )
        return {s.name: min(s.channels, request.get(s.name, s.channels)) for s in specs}
    if request == "auto":
        return {s.name: min(s.channels, AUTO_WIDTH) for s in specs}
    if isinstance(request, float):
        return {s.name: max(1, round(s.channels * request)) for s in specs}
    return {s.name: min(s.channels, int(request)) for s in specs}


class Projection(nn.Module):
    """The projection of some levels: {level: (mean (C,), components (k, C))}, float32.

    forward({level: (B, C, H, W)}) -> the same dict with each projected level (B, k, H, W) in
    float32; other levels pass through. Its tensors are buffers that ``state_dict`` leaves out
    (they are saved with the store and in checkpoints as ``arrays``/``state``).
    """

    def __init__(self, levels: dict[str, tuple[np.ndarray, np.ndarray]], info: dict | None = None):
        super().__init__()
        self.levels = tuple(sorted(levels))
        self.info = dict(info or {})  # the header's record: request, sample, energy kept per level
        for name in self.levels:
            mean, comp = (torch.as_tensor(np.asarray(a, dtype=np.float32)) for a in levels[name])
            if comp.ndim != 2 or mean.shape != (comp.shape[1],):
                raise CachedetError(
                    f"projection of level {name}: components {tuple(comp.shape)} do not fit mean "
                    f"{tuple(mean.shape)}"
                )
            self.register_buffer(f"weight_{name}", comp[:, :, None, None].contiguous(), False)
            self.register_buffer(f"bias_{name}", -(comp @ mean), False)
            self.register_buffer(f"mean_{name}", mean, False)

    def forward(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(feats)
        for name in self.levels:
            w, b = getattr(self, f"weight_{name}"), getattr(self, f"bias_{name}")
            out[name] = F.conv2d(feats[name].float(), w, b)
        return out

    def arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{level: (mean (C,), components (k, C))} float32 numpy, as the store holds them."""
        return {
            name: (
                getattr(self, f"mean_{name}").cpu().numpy(),
                getattr(self, f"weight_{name}")[:, :, 0, 0].cpu().numpy(),
            )
            for name in self.levels
        }

    def state(self) -> dict:
        """What a checkpoint keeps: {"levels": {level: {"mean", "components"}}, "info"} (tensors)."""
        return {
            "levels": {
                n: {"mean": torch.from_numpy(m), "components": torch.from_numpy(c)}
                for n, (m, c) in self.arrays().items()
            },
            "info": self.info,
        }

    @classmethod
    def from_state(cls, state: dict) -> "Projection":
        levels = {
            n: (d["mean"].numpy(), d["components"].numpy()) for n, d in state["levels"].items()
        }
        return cls(levels, state.get("info"))

    @property
    def sha256(self) -> str:
        """Digest of the float32 bytes of every level's mean and components, in level order."""
        return schema.projection_sha256(self.arrays())

    def fingerprint(self) -> dict:
        """What heads trained on projected features depend on: the map (its digest) and the kept
        directions per level."""
        return {
            "sha256": self.sha256,
            "k": {n: int(c.shape[0]) for n, (_, c) in self.arrays().items()},
        }

    def project_specs(self, specs) -> list[FeatureSpec]:
        """The levels' specs after projection (projected levels have k channels)."""
        arrays = self.arrays()
        return [
            replace(s, channels=int(arrays[s.name][1].shape[0])) if s.name in arrays else s
            for s in specs
        ]


class ProjectionFit:
    """Accumulates each level's channel statistics over sample views, then fits their PCA.

    ``keep``: {level: k} (levels with k = C are left out); ``strides``: {level: stride}. ``add``
    takes a batch of features {level: (B, C, H, W)} on any device and the views' unpadded canvas
    sizes (h, w) in pixels: only positions inside a view count (padding would bias the mean), at
    most ``positions`` per view and level (a seeded draw). Sums are float64 on the features' device.
    """

    def __init__(
        self,
        keep: dict[str, int],
        channels: dict[str, int],
        strides: dict[str, int],
        seed: int = 0,
        positions: int = POSITIONS_PER_VIEW,
    ):
        self.keep = {n: k for n, k in keep.items() if k < channels[n]}
        self.strides, self.positions = strides, positions
        self.generator = torch.Generator().manual_seed(seed)
        self.count = dict.fromkeys(self.keep, 0)
        self.sums: dict[str, torch.Tensor] = {}
        self.scatter: dict[str, torch.Tensor] = {}
        self.views = 0

    def add(self, feats: dict[str, torch.Tensor], valid: list[tuple[int, int]]) -> None:
        for name in self.keep:
            x = feats[name]
            stride = self.strides[name]
            for i, (h, w) in enumerate(valid):
                fh, fw = -(-h // stride), -(-w // stride)
                v = x[i, :, :fh, :fw].flatten(1).T  # (positions, C)
                if v.shape[0] > self.positions:
                    pick = torch.randperm(v.shape[0], generator=self.generator)[: self.positions]
                    v = v[pick.to(v.device)]
                v = v.double()
                if name not in self.sums:
                    self.sums[name] = torch.zeros(v.shape[1], dtype=torch.float64, device=v.device)
                    self.scatter[name] = torch.zeros(
                        v.shape[1], v.shape[1], dtype=torch.float64, device=v.device
                    )
                self.sums[name] += v.sum(0)
                self.scatter[name] += v.T @ v
                self.count[name] += v.shape[0]
        self.views += len(valid)

    def result(self, info: dict | None = None) -> Projection:
        """The fitted projection; ``info`` (the request, the sample) is recorded with the energy
        kept per level (the share of the variance its k directions hold)."""
        if not self.views:
            raise CachedetError("ExtractConfig.project: no readable view to fit the projection on")
        levels, energy = {}, {}
        for name, k in self.keep.items():
            n = self.count[name]
            mean = self.sums[name] / n
            cov = self.scatter[name] / n - torch.outer(mean, mean)
            values, vectors = torch.linalg.eigh(cov.cpu())  # ascending
            values, vectors = values.flip(0), vectors.flip(1)
            comp = vectors[:, :k].T  # (k, C)
            rows = torch.arange(k)
            sign = torch.sign(comp[rows, comp.abs().argmax(1)])
            comp = comp * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]
            total = float(values.clamp(min=0).sum())
            energy[name] = round(float(values[:k].clamp(min=0).sum()) / total, 6) if total else 1.0
            levels[name] = (mean.cpu().float().numpy(), comp.float().numpy())
        return Projection(levels, {**(info or {}), "energy": energy, "sample_views": self.views})


def store_projection(url: str, identity: dict, option: str) -> tuple[Projection, dict]:
    """(projection, header entry) of the projected store at ``url``, for a backbone of
    ``identity`` (``Backbone.identity``). Raises CachedetError naming ``option`` when the store
    holds no projection or was extracted with another backbone (name, levels or weights)."""
    reader = StoreIndex(url)
    where = f"{option} {url}"
    entry = reader.header.projection
    if entry is None:
        raise CachedetError(f"{where}: the store holds no projection (extracted without project)")
    theirs, mine = (
        {k: d[k] for k in FINGERPRINT_BACKBONE_KEYS} for d in (reader.header.backbone, identity)
    )
    diff = differences(theirs, mine, "backbone", found_label="store")
    if diff:
        raise CachedetError(
            f"{where}: fitted on another backbone's features: " + "; ".join(diff[:4])
        )
    energy = {n: v["energy"] for n, v in entry["levels"].items()}
    return Projection(reader.projection_arrays(), {"energy": energy}), entry
