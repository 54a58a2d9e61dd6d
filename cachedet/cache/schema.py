"""The cache contract: schema version, header layout, storage dtypes and codecs, compatibility.

Store layout (a zarr v3 group)::

    zarr.json                 attrs["cachedet"] = header (``cachedet.cache.header.StoreHeader``)
    features/<level>          (V, C, H, W) storage dtype; chunk = 1 view; shard = shard_views views
    quant/<level>             (V, C, 2) float32 (offset, step) per view and channel; only for
                              dtypes uint8 and uint4: feature = offset + step * stored (uint4:
                              features/<level> is (V, ceil(C/2), H, W) uint8, two channels per
                              byte, low nibble first)
    projection/<level>/mean   (C,) float32 and projection/<level>/components (k, C) float32: a
                              projected store's map of the backbone's level (C channels) onto the
                              k it stores, y = components @ (x - mean); only for projected levels
                              (header["projection"], ``cachedet.backbones.projection``)
    meta/image_id             (V,) int64         meta/view_index   (V,) int32
    meta/orig_size            (V, 2) int32 (H, W) of the original image
    meta/resized_size         (V, 2) int32 (h, w) after the LSJ resize
    meta/crop_offset          (V, 2) int32 (top, left) of the canvas in the resized image
    meta/flip                 (V,) bool          meta/valid_size   (V, 2) int32 unpadded (h, w)
    meta/scale                (V, 2) float64 (sy, sx) = resized / original
    boxes/offsets             (V + 1,) int64; view i owns rows offsets[i]:offsets[i+1] of
    boxes/xyxy                (N, 4) float32, view-canvas pixels
    boxes/labels              (N,) int64 contiguous labels (header's categories)
    boxes/ann_ids             (N,) int64 source annotation ids
    masks/<shard>/rle         (B,) uint8: the shard's instance masks, concatenated compressed COCO RLE
                              counts (canvas-sized, pycocotools), one per box row of its views, in
                              box-row order; only when header["masks"] is set
    masks/<shard>/offsets     (n + 1,) int64: object i of the shard is rle[offsets[i]:offsets[i+1]]
    _shards/<index>.json      completion record of one shard, written by its one writer after
                              its data: {"shard", "views": [start, end], "crc32c": {level, "masks", or
                              the path of a per-view array ("boxes/xyxy", "meta/flip"...; the
                              shard's rows of it): hex} (older stores: "sha256"; levels only),
                              "skipped": [{"view", "image_id", "error"}], "seconds"}
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from zarr.codecs import BloscCodec

from cachedet.core.errors import CachedetError

FORMAT = "cachedet.features"
SCHEMA_VERSION = 1
DTYPES = ("float16", "bfloat16", "float32", "uint8", "uint4", "float8")
# bytes of a stored element (uint4: one byte holds two channels)
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "uint8": 1, "uint4": 1, "float8": 1}
CODECS = ("zstd", "lz4", "none")
MASK_FORMAT = "coco-rle"  # header["masks"]["format"]: compressed COCO RLE of the view's canvas


def check_storage(dtype: str, codec: str, shard_views: int):
    if dtype not in DTYPES:
        raise CachedetError(f"ExtractConfig.dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if codec not in CODECS:
        raise CachedetError(f"ExtractConfig.codec {codec}: expected one of {', '.join(CODECS)}")
    if shard_views < 1:
        raise CachedetError(
            f"ExtractConfig.shard_views: expected a positive integer, got {shard_views}"
        )


def zarr_dtype(dtype: str) -> str:
    """numpy dtype that holds ``dtype`` on disk (bfloat16 is kept as its raw uint16 bits)."""
    return {
        "float16": "float16",
        "bfloat16": "uint16",
        "float32": "float32",
        "uint8": "uint8",
        "uint4": "uint8",
        "float8": "uint8",  # float8 e4m3fn bits
    }[dtype]


def is_quantized(dtype: str) -> bool:
    """uint8, uint4 and float8 stores carry per-(view, channel) affine parameters beside the
    features."""
    return dtype in ("uint8", "uint4", "float8")


def stored_channels(channels: int, dtype: str) -> int:
    """Channels of a level's stored array: uint4 packs two channels per byte (2c in the low
    nibble, 2c + 1 in the high one; an odd last channel with a zero nibble)."""
    return (channels + 1) // 2 if dtype == "uint4" else channels


def bytes_per_view(shapes: dict[str, tuple[int, int, int]], dtype: str) -> int:
    """Bytes of one view's features as stored, before compression: every level (C, H, W) in
    ``dtype``, plus quantised stores' float32 (offset, step) quant params per channel."""
    quant = 2 * ITEMSIZE["float32"] if is_quantized(dtype) else 0
    return sum(
        stored_channels(c, dtype) * h * w * ITEMSIZE[dtype] + c * quant
        for c, h, w in shapes.values()
    )


def projection_sha256(arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """Digest of a projection ({level: (mean (C,), components (k, C))}): each level's name, then
    the shapes and float32 bytes of its mean and components, in level order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        for a in arrays[name]:
            a = np.ascontiguousarray(a, dtype=np.float32)
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
    return h.hexdigest()


def compressors(codec: str) -> list:
    if codec == "none":
        return []
    return [BloscCodec(cname=codec, clevel=3 if codec == "zstd" else 5, shuffle="bitshuffle")]


def encode(features: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 (n, C, H, W) numpy -> (on-disk array of ``dtype``, quant params (n, C, 2) or None).

    The host-side form of ``encode_tensor`` (same bytes: it runs it on a CPU tensor).
    """
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    stored, params = encode_tensor(x, dtype)
    return stored_numpy(stored, dtype), None if params is None else params.numpy()


# the largest magnitude each storage dtype holds as a finite value (float32 and uint8 take any
# finite float32; uint8's per-channel range then spans it)
FINITE_LIMIT = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38}


def encode_tensor(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features (n, C, H, W), any float dtype, on any device -> (stored, quant params (n, C, 2) or
    None), both on ``x``'s device, so that only the stored bytes need to cross to the host.

    ``stored`` has the numpy dtype of ``zarr_dtype(dtype)`` once moved to the CPU (bfloat16 as its
    raw bits in int16; view them as uint16). Values are first taken to float32. Floats round to
    nearest even. uint8 maps each view's channel [min, max] affinely onto 0..255, so the error is
    at most half a step, (max - min) / 510; uint4 onto 0..15 (error at most (max - min) / 30),
    packed two channels per byte (``pack_nibbles``); float8 stores torch's float8 e4m3fn of the
    channel centred on its mid-range and scaled onto +-448 (3 mantissa bits: relative error at most
    1/16); quant params are float32 (offset, step): feature = offset + step * value.
    """
    x = x.float()
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16), None
    if dtype == "float8":  # e4m3fn of (x - centre) / scale, scale = half-range / 448 per channel
        flat = x.flatten(2)
        lo, hi = flat.amin(dim=2), flat.amax(dim=2)
        centre = (lo + hi) / 2
        step = torch.where(hi > lo, (hi - lo) / (2 * 448.0), torch.ones_like(hi))
        y = (x - centre[..., None, None]) / step[..., None, None]
        bits = y.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
        return bits, torch.stack([centre, step], dim=-1)
    if dtype in ("uint8", "uint4"):
        top = 255.0 if dtype == "uint8" else 15.0
        flat = x.flatten(2)
        lo, hi = flat.amin(dim=2), flat.amax(dim=2)
        step = torch.where(hi > lo, (hi - lo) / top, torch.ones_like(hi))
        q = torch.round((x - lo[..., None, None]) / step[..., None, None]).clamp_(0, top)
        q = q.to(torch.uint8)
        if dtype == "uint4":
            q = pack_nibbles(q)
        return q, torch.stack([lo, step], dim=-1)
    return x.to(getattr(torch, zarr_dtype(dtype))), None


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 (n, C, H, W) of values 0..15 -> (n, ceil(C / 2), H, W): channel 2c in the low
    nibble, 2c + 1 in the high one."""
    if q.shape[1] % 2:
        q = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: np.ndarray, channels: int) -> np.ndarray:
    """The inverse of ``pack_nibbles``: (n, ceil(C / 2), H, W) -> uint8 (n, C, H, W)."""
    n, half, h, w = packed.shape
    out = np.empty((n, 2 * half, h, w), dtype=np.uint8)
    out[:, 0::2] = packed & 15
    out[:, 1::2] = packed >> 4
    return out[:, :channels]


def encode_into(x: torch.Tensor, dtype: str, out: np.ndarray) -> np.ndarray | None:
    """Encode features ``x`` (n, C, H, W) on any device into ``out``, a host array (n, C, H, W) of
    ``zarr_dtype(dtype)``, with the bytes ``encode_tensor`` gives; return the uint8 quant params
    (n, C, 2) or None.

    A float storage dtype is a rounding cast, done in the copy itself on the host (no intermediate
    array) and before the copy on an accelerator (only stored bytes cross to the host).
    """
    dst = torch.from_numpy(out)
    if dtype in ("float16", "bfloat16", "float32"):
        target = torch.bfloat16 if dtype == "bfloat16" else getattr(torch, zarr_dtype(dtype))
        x = x.float()
        dst.view(target).copy_(x if x.device.type == "cpu" else x.to(target))
        return None
    stored, params = encode_tensor(x, dtype)
    dst.copy_(stored)
    return params.cpu().numpy()


def stored_numpy(stored: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU tensor from ``encode_tensor`` -> the numpy array zarr stores (bfloat16 bits as uint16)."""
    arr = stored.numpy()
    return arr.view(np.uint16) if dtype == "bfloat16" else arr


def decode(stored: np.ndarray, dtype: str, quant: np.ndarray | None = None) -> np.ndarray:
    """On-disk features (n, C, H, W) [+ quant params (n, C, 2) for uint8 and uint4, whose stored
    array is (n, ceil(C / 2), H, W)] -> float32 (n, C, H, W)."""
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("uint8", "uint4", "float8"):
        if quant is None:
            raise ValueError(f"{dtype} features need their quant parameters to decode")
        if dtype == "uint4":
            stored = unpack_nibbles(stored, quant.shape[1])
        if dtype == "float8":
            values = torch.from_numpy(np.ascontiguousarray(stored)).view(torch.float8_e4m3fn)
            values = values.float().numpy()
        else:
            values = stored.astype(np.float32)
        return quant[..., 0, None, None] + quant[..., 1, None, None] * values
    if (
        dtype == "float16"
    ):  # torch converts with vector instructions, numpy's astype about 6x slower
        return torch.from_numpy(np.ascontiguousarray(stored)).float().numpy()
    return stored.astype(np.float32)
