"""Decode and augmentation of image batches, for the CPU workers of the data pipeline.

A dataset whose manifest says `"encoding": "image"` stores each image's JPEG/PNG/WebP bytes; this
module turns a batch of them (or of stored uint8 pixels) into a uint8 (N, C, H, W) array of one
size, with the train-time augmentation of the stage's `augment:` config section:

    train=True    optional random-resized crop (scale, ratio) to `size`, else resize + centre crop;
                  optional horizontal flip (p = 0.5)
    train=False   resize the shorter side to `resize` (default: `size`), centre crop `size`:
                  deterministic, for validation, test, clustering, targets and inference

Randomness is per sample and seeded from (seed, sample key, epoch): the same run sees the same
crops, every epoch sees new ones, and no global RNG is touched (safe inside training workers).
Normalisation (`mean`/`std`) is not applied here but on the device, after the uint8 batch has
been copied there (`normalize_on_device`): a quarter of the bytes to move and no float copy on
the CPU. With the default mean = std = 0.5 it equals `models.prepare_inputs` ([-1, 1]).

The functional ops are torchvision's (`torchvision.transforms.v2.functional`), on uint8 tensors
with antialiasing; Pillow decodes. No Ray here: the Ray Data pipeline calls
`make_batch_transform(...)` from `map_batches`.
"""
from __future__ import annotations

import hashlib
import io
import math
from typing import Any, Callable, Optional, Sequence

import numpy as np

Batch = dict[str, Any]


def _cfg(augment_cfg: Any) -> dict:
    if augment_cfg is None:
        return {}
    if hasattr(augment_cfg, "model_dump"):
        return augment_cfg.model_dump()
    return dict(augment_cfg)


def _pair(v: Any) -> Optional[tuple[int, int]]:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[1])) if len(v) == 2 else (int(v[0]), int(v[0]))
    return int(v), int(v)


def output_shape(augment_cfg: Any, manifest: dict) -> tuple[int, ...]:
    """Per-sample shape of the batches `make_batch_transform` returns: what models are built for.

    Images: (channels of the dataset, *size), where size defaults to the manifest's nominal
    (H, W). Vectors (float32 datasets) keep their stored shape."""
    shape = tuple(int(s) for s in manifest["input_shape"])
    if len(shape) != 3:
        return shape
    size = _pair(_cfg(augment_cfg).get("size")) or shape[1:]
    return (shape[0], *size)


def sample_seed(seed: int, key: str, epoch: int) -> np.random.Generator:
    """The generator of one sample's augmentation in one epoch (independent of batch and worker)."""
    k = int.from_bytes(hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest(), "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), k]))


def decode_image(blob: bytes, channels: int, min_side: Optional[int] = None):
    """Encoded bytes -> uint8 tensor (channels, H, W); `channels` 1 (greyscale) or 3 (RGB).

    `min_side`: a JPEG is decoded at the smallest DCT scale whose shorter side is still at least
    this (Pillow's draft mode: much less work for large photos shown small)."""
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as im:
        if min_side and im.format == "JPEG":
            w, h = im.size
            f = min_side / max(1, min(w, h))
            if f < 0.5:
                im.draft("L" if channels == 1 else "RGB", (math.ceil(w * f), math.ceil(h * f)))
        im = im.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(im, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def _rrc_params(h: int, w: int, scale: Sequence[float], ratio: Sequence[float],
                rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized crop: torchvision's RandomResizedCrop rule
    (10 tries at a random area fraction and log-uniform aspect ratio, then the central crop),
    drawn from `rng` instead of torch's global generator."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _resize_centre_crop(img, size: tuple[int, int], resize: Optional[int]):
    from torchvision.transforms.v2 import functional as TF

    h, w = img.shape[-2:]
    if resize is None:
        # Shorter side to the crop's larger side: the whole crop lies inside the image.
        scale = max(size[0] / h, size[1] / w)
    else:
        scale = resize / min(h, w)
    nh, nw = max(size[0], round(h * scale)), max(size[1], round(w * scale))
    if (nh, nw) != (h, w):
        img = TF.resize(img, [nh, nw], antialias=True)
    return TF.center_crop(img, list(size))


def make_sample_transform(augment_cfg: Any, manifest: dict, train: bool) -> Callable[[Any, np.random.Generator], Any]:
    """(uint8 tensor (C, H, W), per-sample generator) -> uint8 tensor (C, *size)."""
    from torchvision.transforms.v2 import functional as TF

    cfg = _cfg(augment_cfg)
    shape = output_shape(cfg, manifest)
    if len(shape) != 3:
        return lambda x, rng: x  # vectors: nothing to crop or flip
    size = (int(shape[1]), int(shape[2]))
    resize = cfg.get("resize")
    rrc = cfg.get("random_resized_crop") if train else None
    ratio = cfg.get("ratio") or (3 / 4, 4 / 3)
    flip = bool(cfg.get("hflip")) and train

    def apply(img, rng: np.random.Generator):
        if rrc:
            top, left, ch, cw = _rrc_params(int(img.shape[-2]), int(img.shape[-1]), rrc, ratio, rng)
            img = TF.resized_crop(img, top, left, ch, cw, list(size), antialias=True)
        else:
            img = _resize_centre_crop(img, size, resize)
        if flip and rng.random() < 0.5:
            img = TF.horizontal_flip(img)
        return img

    return apply


def make_batch_transform(augment_cfg: Any, manifest: dict, train: bool, seed: int) -> Callable[[Batch, int], Batch]:
    """The function the data pipeline applies to every batch: `fn(batch, epoch) -> batch`.

    augment_cfg: the stage's `augment:` section (`pipeline.config.AugmentConfig`, or its dict), or
        None: images are only decoded and brought to the manifest's nominal size, stored arrays
        pass through unchanged.
    manifest: the dataset's manifest (encoding, input_shape).
    train: True for the training view (random crop / flip when configured), False for the
        deterministic view of evaluation, clustering, targets and inference.
    seed: the run's seed; each sample's randomness is seeded from (seed, its key, epoch).

    The batch is a dict of numpy arrays: "image" (1-D object array of encoded bytes) or "x"
    (uint8 (N, C, H, W), or float32 vectors which pass through), plus "key" (str array; needed
    when train augmentation is on) and "y". `epoch` (the pass) seeds the views; when it is None,
    a per-row "epoch" column is used if the batch has one (rows of several passes), else 0. Returned: the same dict with "x" a uint8 (N, C, H, W)
    array of `output_shape(augment_cfg, manifest)` and "image" removed; other entries are kept.
    """
    import torch

    cfg = _cfg(augment_cfg)
    shape = tuple(int(s) for s in manifest["input_shape"])
    channels = shape[0] if len(shape) == 3 else 1
    apply = make_sample_transform(cfg, manifest, train)
    out_shape = output_shape(cfg, manifest)
    random = train and bool(cfg.get("random_resized_crop") or cfg.get("hflip"))
    min_side = None if random else (cfg.get("resize") or max(out_shape[1:]) if len(out_shape) == 3 else None)

    def transform(batch: Batch, epoch: Optional[int] = None) -> Batch:
        out = dict(batch)
        if "image" in out:
            images = [decode_image(b, channels, min_side) for b in out.pop("image")]
        else:
            x = np.asarray(out["x"])
            if x.dtype != np.uint8 or x.ndim != 4 or not cfg:
                return out  # vectors, floats, or stored pixels without an augment section
            images = [torch.from_numpy(np.ascontiguousarray(v)) for v in x]
        n = len(images)
        if random:
            if "key" not in out:
                raise ValueError("make_batch_transform: train augmentation needs the batch's 'key' column")
            keys = [str(k) for k in np.asarray(out["key"]).tolist()]
            if epoch is None:  # per-row passes (a training stream's "epoch" column), else epoch 0
                epochs = np.asarray(out["epoch"]).tolist() if "epoch" in out else [0] * n
            else:
                epochs = [int(epoch)] * n
            rngs = [sample_seed(seed, k, e) for k, e in zip(keys, epochs)]
        else:
            rngs = [None] * n
        res = np.empty((n, *out_shape), dtype=np.uint8)
        for i, (img, rng) in enumerate(zip(images, rngs)):
            res[i] = apply(img, rng).numpy()
        out["x"] = res
        return out

    return transform


def normalize_on_device(x, cfg: Any = None):
    """uint8 batch (N, C, H, W) already on its device -> float32 normalised by the config's
    mean/std (per channel, in 0..1 units); default mean = std = 0.5, i.e. [-1, 1] like
    `models.prepare_inputs`. A float batch is taken as already prepared and returned as is."""
    import torch

    if x.dtype != torch.uint8:
        return x if x.dtype == torch.float32 else x.float()
    c = _cfg(cfg)
    mean = c.get("mean") or [0.5]
    std = c.get("std") or [0.5]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(shape)
    return (x.float().div_(255.0) - m).div_(s)


__all__ = ["decode_image", "make_batch_transform", "make_sample_transform", "normalize_on_device",
           "output_shape", "sample_seed"]
