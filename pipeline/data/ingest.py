"""Raw data -> WebDataset shards + `manifest.json` (`distill data ingest`, and the `data` stage).

Shards are written as they are filled, so memory does not grow with the dataset: each format's
loader gives either in-memory arrays (the small array formats below), a list of files read per
shard in parallel (`folder`), or a generator that yields blocks (`synthetic`). The rest is shared:
checks (label range, shapes, dtypes), a stratified seeded val split carved from train when the
source has none (on labels and indices only; for a generated source, on the fly from class counts
of a first pass over its labels), a seeded shuffle of train and val (so every shard holds a mix
of classes), and the atomic, resumable write of shards and manifest.

Formats (`--format`):
  idx        MNIST-format files (`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
             `t10k-...`) in one folder: MNIST, Fashion-MNIST, KMNIST. An optional `class_names.txt`
             (one name per line) names the classes and fixes their number.
  cifar      the CIFAR-10 / CIFAR-100 "python version" tarballs. These hold Python pickles: use only
             tarballs from a trusted source (the official download). They are the only pickles this
             project ever reads, and even they go through an unpickler that refuses every global
             except the few numpy needs to rebuild an array.
  npz        a NumPy archive with `x_train, y_train, x_test, y_test` (optional `x_val, y_val`,
             `class_names`), loaded with `allow_pickle=False`.
  folder     class-per-folder images, local or s3://: `SOURCE/{train,test[,val]}/CLASS/*`, or
             `SOURCE/CLASS/*` (then test is carved like val). Any sizes and modes. Images are kept
             encoded: JPEG/PNG/WebP files are stored byte for byte as `{key}.jpg|png|webp` members
             (other formats Pillow reads are re-encoded once as PNG); every file is decoded once
             first, and all unreadable ones are named together (exit 2, nothing written).
  digits     scikit-learn's bundled 8x8 digits (no download); test carved from it.
  synthetic  seeded vectors with confusable class groups (`SyntheticGenerator`), groups in the
             manifest; generated block by block from per-block seeds.

Inputs are stored as uint8 images (N, C, H, W) (models map them to [-1, 1]), float32 vectors
(N, D) for synthetic data (manifest `"encoding": "npy"`), or encoded images (`"encoding": "image"`,
decoded at training time by `pipeline.transforms`). Sample keys are `{split}_{index:08d}`.

Atomicity and reruns: every shard is published whole (temp file + rename locally, one PUT on S3);
the manifest goes last and is removed first when the folder is being rewritten, so a manifest
always describes complete shards. Shard bytes are deterministic, so a rerun after an interruption
keeps the shards already written (same sha256), writes the rest and never duplicates a sample; a
rerun of a finished ingest with the same settings does nothing.

Foreign files: ingest only ever removes or overwrites files it wrote itself, i.e. the shards listed
in its own previous `manifest.json` or in the journal (`.distill-ingest.json`) an unfinished ingest
left behind. A `manifest.json` that distill did not write, or a shard-named file it would overwrite
without having written it, stops the ingest with exit 2 before anything is written.
"""
from __future__ import annotations

import collections
import gzip
import io
import json
import os
import pickle
import re
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from pipeline import storage
from pipeline.config import FORMATS, SyntheticConfig, parse_overrides
from pipeline.data.shards import (FORMAT_VERSION, MANIFEST, SHARD_RE, SPLITS, encode_image_shard, encode_shard,
                                  prefetch, sample_key, shard_name)
from pipeline.errors import UserError

DEFAULT_TEST_FRACTION = 0.2

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]


@dataclass
class RawData:
    """What a loader returns: the splits plus what the manifest says about the classes.

    Array formats: `splits` maps "train", "test", optional "val" (or "all" for one pool) to
    in-memory (x, y). A folder: `splits` maps to (file indices, y) and `fetch(indices)` reads those
    files' encoded bytes. A generator: `splits` is empty and `stream` yields blocks
    (`SyntheticGenerator`). The last two give `input_shape` and `dtype` themselves.
    """

    name: str
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    class_names: list[str]
    class_groups: Optional[list[list[int]]] = None
    extra: dict[str, Any] = field(default_factory=dict)  # more manifest keys (e.g. group_names)
    encoding: str = "npy"  # "npy" (one .input.npy member per sample) or "image" (encoded bytes)
    fetch: Optional[Callable[[np.ndarray], Any]] = None
    stream: Any = None
    input_shape: Optional[list[int]] = None
    dtype: Optional[str] = None


def _log(msg: str) -> None:
    from pipeline.runner import log

    log(msg)


def _check_labels(y: np.ndarray, num_classes: int, where: str) -> None:
    if len(y) == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        i = int(np.flatnonzero(y == bad)[0])
        raise UserError(
            f"{where}: label {bad} (sample {i}) is out of range: labels must be 0..{num_classes - 1} "
            f"for the {num_classes} classes. Fix the labels, or the class list, of the source"
        )


def _as_labels(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        raise UserError(f"{where}: labels must be a 1-D integer array, got dtype {y.dtype} and shape {y.shape}")
    return y.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# idx (MNIST family)
# ---------------------------------------------------------------------------------------------

_IDX_NAMES = {
    ("train", "images"): re.compile(r"^train[-_.]images[-_.]idx3[-_.]ubyte(\.gz)?$"),
    ("train", "labels"): re.compile(r"^train[-_.]labels[-_.]idx1[-_.]ubyte(\.gz)?$"),
    ("test", "images"): re.compile(r"^(t10k|test)[-_.]images[-_.]idx3[-_.]ubyte(\.gz)?$"),
    ("test", "labels"): re.compile(r"^(t10k|test)[-_.]labels[-_.]idx1[-_.]ubyte(\.gz)?$"),
}


def read_idx(uri: str, expect_ndim: int) -> np.ndarray:
    """An IDX (MNIST-format) uint8 array, gzipped or not; UserError naming the file when malformed."""
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        raise UserError(f"{uri}: file not found") from None
    if uri.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{uri}: not a valid gzip file ({e}); it may be truncated - download it again") from None
    kind = "images" if expect_ndim == 3 else "labels"
    expected = 0x0800 | expect_ndim
    if len(raw) < 4:
        raise UserError(f"{uri}: only {len(raw)} bytes; an IDX file starts with a 4-byte magic number")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected:
        raise UserError(
            f"{uri}: wrong IDX magic number 0x{magic:08X}; expected 0x{expected:08X} (unsigned bytes, "
            f"{expect_ndim} dimension{'s' if expect_ndim > 1 else ''}) for MNIST-format {kind}. "
            "Is this an MNIST-format file, and the right one (images vs labels)?"
        )
    head = 4 + 4 * expect_ndim
    if len(raw) < head:
        raise UserError(f"{uri}: truncated IDX header ({len(raw)} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(expect_ndim))
    need = int(np.prod(dims, dtype=np.int64))
    have = len(raw) - head
    if have != need:
        raise UserError(f"{uri}: header says {dims} ({need} bytes of data) but the file holds {have}; "
                        "it is truncated or not an IDX file - download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def load_idx(source: str, **_: Any) -> RawData:
    if not storage.exists(source):
        raise UserError(f"{source}: no such file or directory (idx format expects a folder holding "
                        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                        "t10k-labels-idx1-ubyte.gz)")
    if not storage.isdir(source):
        raise UserError(f"{source}: is a file; idx format expects the folder that holds the four MNIST-format files")
    names = storage.listdir(source)
    found: dict[tuple[str, str], str] = {}
    for key, pattern in _IDX_NAMES.items():
        hits = sorted(n for n in names if pattern.match(n))
        if not hits:
            want = {"train": "train", "test": "t10k"}[key[0]] + f"-{key[1]}-idx{3 if key[1] == 'images' else 1}-ubyte.gz"
            raise UserError(
                f"{source}: no {key[0]} {key[1]} file ({want} or unzipped); the folder holds: "
                f"{', '.join(names[:12]) or 'nothing'}"
            )
        found[key] = storage.join(source, hits[0])
    splits = {}
    for split in ("train", "test"):
        x = read_idx(found[(split, "images")], 3)
        y = read_idx(found[(split, "labels")], 1)
        if len(x) != len(y):
            raise UserError(f"{found[(split, 'images')]} holds {len(x)} images but "
                            f"{found[(split, 'labels')]} holds {len(y)} labels; they must match")
        splits[split] = (x[:, None, :, :], y.astype(np.int64))
    ytrain, train_labels = splits["train"][1], found[("train", "labels")]
    names_uri = storage.join(source, "class_names.txt")
    dataset = storage.get_fs(source)[1].rstrip("/").rsplit("/", 1)[-1]
    if "class_names.txt" in names:
        class_names = [ln.strip() for ln in storage.read_bytes(names_uri).decode("utf-8").splitlines() if ln.strip()]
        for split in ("train", "test"):
            _check_labels(splits[split][1], len(class_names), found[(split, "labels")])
    else:
        num_classes = int(ytrain.max()) + 1 if len(ytrain) else 0
        present = np.bincount(ytrain, minlength=num_classes) > 0
        if not present.all():
            gaps = np.flatnonzero(~present)
            raise UserError(
                f"{train_labels}: labels are not 0..{num_classes - 1}: label {int(ytrain.max())} occurs but "
                f"{len(gaps)} smaller label(s) never do (e.g. {int(gaps[0])}); labels out of range? "
                f"Add class_names.txt (one name per line) to {source} to fix the number of classes"
            )
        _check_labels(splits["test"][1], num_classes, found[("test", "labels")])
        if "fashion" in dataset.lower() and num_classes == len(FASHION_MNIST_CLASSES):
            class_names = list(FASHION_MNIST_CLASSES)
        else:
            class_names = [str(i) for i in range(num_classes)]
    return RawData(name=dataset, splits=splits, class_names=class_names)


# ---------------------------------------------------------------------------------------------
# cifar
# ---------------------------------------------------------------------------------------------

class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, and refuses every other global.

    The CIFAR tarballs are pickles; a tampered one could otherwise run arbitrary code on load.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure means "not a CIFAR batch"
        raise UserError(f"{where}: not a CIFAR python batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: not a CIFAR python batch (a dict is expected)")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _names(values: Any) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def load_cifar(source: str, **_: Any) -> RawData:
    if not storage.exists(source):
        raise UserError(f"{source}: no such file (cifar format expects cifar-10-python.tar.gz or "
                        "cifar-100-python.tar.gz)")
    members: dict[str, bytes] = {}
    wanted = re.compile(r"^(data_batch_\d+|test_batch|batches\.meta|train|test|meta)$")
    try:
        with storage.local_copy(source) as path, tarfile.open(path, mode="r:*") as tf:
            for m in tf:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and wanted.match(base):
                    f = tf.extractfile(m)
                    members[base] = f.read() if f else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise UserError(f"{source}: truncated or damaged tar archive ({type(e).__name__}: {e}); "
                        "download the CIFAR python tarball again") from None
    if "batches.meta" in members:  # CIFAR-10
        batches = sorted((n for n in members if n.startswith("data_batch_")),
                         key=lambda n: int(n.rsplit("_", 1)[1]))
        if not batches or "test_batch" not in members:
            raise UserError(f"{source}: CIFAR-10 tarball without data_batch_* / test_batch; download it again")
        meta = _unpickle(members["batches.meta"], f"{source}:batches.meta")
        class_names = _names(meta.get("label_names", []))
        parts = {"train": batches, "test": ["test_batch"]}
        label_key, groups, extra = "labels", None, {}
    elif "meta" in members and "train" in members and "test" in members:  # CIFAR-100
        meta = _unpickle(members["meta"], f"{source}:meta")
        class_names = _names(meta.get("fine_label_names", []))
        parts = {"train": ["train"], "test": ["test"]}
        label_key, groups, extra = "fine_labels", [], {"group_names": _names(meta.get("coarse_label_names", []))}
    else:
        raise UserError(f"{source}: not a CIFAR-10/100 python tarball (found {', '.join(sorted(members)) or 'no'} "
                        "batch files); expected cifar-10-batches-py/data_batch_1.. or cifar-100-python/train")
    if not class_names:
        raise UserError(f"{source}: the meta file lists no class names")
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    coarse_of: dict[int, int] = {}
    for split, names in parts.items():
        xs, ys = [], []
        for n in names:
            where = f"{source}:{n}"
            batch = _unpickle(members[n], where)
            if "data" not in batch or label_key not in batch:
                raise UserError(f"{where}: batch lacks 'data' or '{label_key}'")
            x = np.asarray(batch["data"])
            y = _as_labels(np.asarray(batch[label_key]), where)
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
                raise UserError(f"{where}: expected uint8 data of shape (N, 3072) and N labels, "
                                f"got {x.dtype} {x.shape} and {len(y)} labels")
            _check_labels(y, len(class_names), where)
            if groups is not None and "coarse_labels" in batch:
                for f_, c_ in zip(y.tolist(), np.asarray(batch["coarse_labels"]).tolist()):
                    coarse_of.setdefault(f_, int(c_))
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(y)
        splits[split] = (np.concatenate(xs), np.concatenate(ys))
    if groups is not None and coarse_of:
        ncoarse = max(coarse_of.values()) + 1
        groups = [sorted(f for f, c in coarse_of.items() if c == g) for g in range(ncoarse)]
    name = "cifar-10" if label_key == "labels" else "cifar-100"
    return RawData(name=name, splits=splits, class_names=class_names, class_groups=groups or None, extra=extra)


# ---------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------

def _to_stored(x: np.ndarray, where: str) -> np.ndarray:
    """uint8 images stay uint8 (N, C, H, W); integer data in 0..255 becomes uint8; floats float32.

    (N, H, W) gains a channel axis; (N, H, W, C) with C in 1/3/4 is moved to channels-first.
    """
    x = np.asarray(x)
    if x.ndim < 2:
        raise UserError(f"{where}: inputs must have a sample axis and at least one feature axis, got shape {x.shape}")
    if x.dtype == np.bool_ or (np.issubdtype(x.dtype, np.integer) and x.dtype != np.uint8):
        if x.size and (x.min() < 0 or x.max() > 255):
            x = x.astype(np.float32)
        else:
            x = x.astype(np.uint8)
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if x.size and not np.all(np.isfinite(x)):
            raise UserError(f"{where}: inputs contain NaN or infinite values")
    elif x.dtype != np.uint8:
        raise UserError(f"{where}: inputs of dtype {x.dtype} are not supported (use uint8 images or floats)")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def load_npz(source: str, **_: Any) -> RawData:
    if not storage.exists(source):
        raise UserError(f"{source}: no such file (npz format expects a .npz with x_train, y_train, x_test, y_test)")
    try:
        with storage.local_copy(source) as path, np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        raise UserError(f"{source}: cannot be read without unpickling ({e}); store plain numeric arrays "
                        "(and class_names as a string array)") from None
    except (OSError, EOFError, zlib.error, KeyError) as e:
        raise UserError(f"{source}: not a valid .npz file ({type(e).__name__}: {e})") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise UserError(f"{source}: missing array(s) {', '.join(missing)}; found {', '.join(sorted(arrays)) or 'none'}. "
                        "Expected x_train, y_train, x_test, y_test (optional x_val, y_val, class_names)")
    split_names = ["train", "test"] + (["val"] if "x_val" in arrays else [])
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise UserError(f"{source}: has only one of x_val / y_val; give both or neither")
    splits = {}
    for s in split_names:
        x = _to_stored(arrays[f"x_{s}"], f"{source}:x_{s}")
        y = _as_labels(arrays[f"y_{s}"], f"{source}:y_{s}")
        if len(x) != len(y):
            raise UserError(f"{source}: x_{s} has {len(x)} samples but y_{s} has {len(y)}")
        splits[s] = (x, y)
    if "class_names" in arrays:
        class_names = [str(v) for v in np.asarray(arrays["class_names"]).ravel().tolist()]
    else:
        top = max((int(y.max()) for _, y in splits.values() if len(y)), default=-1)
        class_names = [str(i) for i in range(top + 1)]
    for s, (_, y) in splits.items():
        _check_labels(y, len(class_names), f"{source}:y_{s}")
    name = os.path.splitext(source.rstrip("/").rsplit("/", 1)[-1])[0]
    return RawData(name=name, splits=splits, class_names=class_names)


# ---------------------------------------------------------------------------------------------
# folder of images (kept encoded)
# ---------------------------------------------------------------------------------------------

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Formats stored as they are, byte for byte (their tar member extension); any other format Pillow
# reads (BMP, GIF, TIFF, ...) is re-encoded once as PNG, which is lossless.
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_FORMAT_NAMES = {"jpg": "jpeg", "png": "png", "webp": "webp"}
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
# Files read at once by the thread pools of `load_folder` and `_FolderFetch` (Pillow releases the
# GIL while it decodes, and S3 reads are round trips, so threads overlap both).
_READ_WORKERS = max(4, min(32, 4 * (os.cpu_count() or 1)))
_MAX_NAMED = 50  # bad files named one per line in the error message (all are counted)


def _image_uri(source: str, path: str) -> str:
    return path if not storage.is_remote(source) else f"{source.split('://', 1)[0]}://{path}"


def _probe_image(fs, path: str) -> tuple[str, int, int, int]:
    """(member extension, height, width, channels) of one image file, decoded once to prove it is
    whole (a truncated JPEG opens fine and fails only here). Raises on any unreadable file."""
    from PIL import Image

    with fs.open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        w, h, fmt, mode = im.width, im.height, im.format, im.mode
        if fmt == "JPEG":
            im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))  # DCT scaling: every scan is read, 8x less work
        im.load()
    if w < 1 or h < 1:
        raise ValueError(f"empty image ({w}x{h})")
    return _KEPT_FORMATS.get(fmt, "png"), h, w, 1 if mode in _GREY_MODES else 3


def _read_encoded(fs, path: str, ext: str) -> bytes:
    """The bytes stored for one image: the file itself, or a PNG re-encoding of other formats."""
    with fs.open(path, "rb") as f:
        data = f.read()
    if ext != "png" or data[:8] == b"\x89PNG\r\n\x1a\n":
        return data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode not in ("1", "L", "LA", "I", "I;16", "RGB", "RGBA", "P"):
            im = im.convert("RGBA" if "A" in im.mode else "RGB")
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()


class _FolderFetch:
    """What the writer calls per shard: the encoded bytes of the images at `indices`, read in threads."""

    def __init__(self, fs, paths: list[str], exts: list[str], source: str):
        self.fs, self.paths, self.exts, self.source = fs, paths, exts, source

    def __call__(self, indices: np.ndarray) -> "ImageBatch":
        from concurrent.futures import ThreadPoolExecutor

        idx = [int(i) for i in indices]
        with ThreadPoolExecutor(max_workers=_READ_WORKERS, thread_name_prefix="distill-img") as ex:
            try:
                blobs = list(ex.map(lambda i: _read_encoded(self.fs, self.paths[i], self.exts[i]), idx))
            except Exception as e:  # noqa: BLE001 - a file changed or vanished since it was checked
                raise UserError(f"{self.source}: an image changed or became unreadable while the shards were "
                                f"written ({type(e).__name__}: {e}); fix the folder and ingest again") from None
        return ImageBatch(blobs, [self.exts[i] for i in idx])


@dataclass
class ImageBatch:
    """Encoded images for one shard: bytes per sample and the tar member extension of each."""

    blobs: list[bytes]
    exts: list[str]

    def __len__(self) -> int:
        return len(self.blobs)


def load_folder(source: str, **_: Any) -> RawData:
    """Class-per-folder images, kept encoded: every file is read and decoded once (in parallel) to
    find unreadable ones, which are all named at once; shards then hold the files' own bytes."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise UserError("the folder format reads images with Pillow, which is not installed: pip install pillow") from None
    if not storage.exists(source) or not storage.isdir(source):
        raise UserError(f"{source}: no such folder (folder format expects SOURCE/train/CLASS/*.jpg and "
                        "SOURCE/test/CLASS/*.jpg, or SOURCE/CLASS/*.jpg)")
    fs, root = storage.get_fs(source)
    top = [n for n in storage.listdir(source) if not n.startswith(".")]
    if "train" in top:
        if "test" not in top:
            raise UserError(f"{source}: has train/ but no test/; add test/CLASS/... or put class folders at the top")
        split_dirs = {s: storage.join(source, s) for s in ("train", "val", "test") if s in top}
    else:
        split_dirs = {"all": source}
    train_dir = split_dirs.get("train", source)
    class_names = sorted(n for n in storage.listdir(train_dir)
                         if not n.startswith(".") and storage.isdir(storage.join(train_dir, n)))
    if not class_names:
        raise UserError(f"{train_dir}: no class folders found (expected one folder per class)")
    index = {c: i for i, c in enumerate(class_names)}
    paths: list[str] = []
    per_split: dict[str, tuple[int, int, list[int]]] = {}  # split -> (first, end, labels)
    for split, folder in split_dirs.items():
        first, labels = len(paths), []
        for cname in storage.listdir(folder):
            cdir = storage.join(folder, cname)
            if cname.startswith(".") or not storage.isdir(cdir):
                continue
            if cname not in index:
                raise UserError(f"{cdir}: class '{cname}' does not exist in {train_dir}; "
                                "every split must use the training classes")
            files = sorted(p for p in fs.find(storage.get_fs(cdir)[1]) if p.lower().endswith(_IMAGE_EXT)
                           and not p.rsplit("/", 1)[-1].startswith("."))
            if not files and split in ("train", "all"):
                raise UserError(f"{cdir}: no images ({', '.join(_IMAGE_EXT)}) in this class folder")
            paths.extend(files)
            labels.extend([index[cname]] * len(files))
        if not labels:
            raise UserError(f"{folder}: no images found")
        per_split[split] = (first, len(paths), labels)

    from tqdm import tqdm

    n = len(paths)
    exts: list[str] = [""] * n
    hw = np.zeros((n, 2), dtype=np.int32)
    colour = np.zeros(n, dtype=bool)
    bad: list[tuple[str, str]] = []

    def probe(i: int):
        try:
            return i, _probe_image(fs, paths[i]), None
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a damaged file
            if type(e).__name__ == "UnidentifiedImageError":
                return i, None, "not an image format Pillow can identify (empty, damaged header, or not an image)"
            return i, None, f"{type(e).__name__}: {e}"

    with tqdm(total=n, desc="check images", unit="img", file=sys.stderr, disable=n < 2000) as bar:
        # prefetch keeps a bounded window of reads in flight (not one future per file).
        for _, fut in prefetch(probe, range(n), workers=_READ_WORKERS, window=4 * _READ_WORKERS):
            i, info, err = fut.result()
            if err is not None:
                bad.append((_image_uri(source, paths[i]), err))
            else:
                exts[i], hw[i, 0], hw[i, 1], ch = info
                colour[i] = ch == 3
            bar.update(1)
    if bad:
        shown = "\n  ".join(f"{u}: {why}" for u, why in bad[:_MAX_NAMED])
        more = f"\n  ... and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else ""
        raise UserError(f"{source}: {len(bad)} of {n} image file(s) cannot be read or decoded:\n  {shown}{more}\n"
                        "Replace or delete these files (or move them out of the folder) and ingest again; "
                        "nothing was written")
    fetch = _FolderFetch(fs, paths, exts, source)
    splits = {s: (np.arange(a, b), np.asarray(lab, dtype=np.int64)) for s, (a, b, lab) in per_split.items()}
    sizes, counts = np.unique(hw, axis=0, return_counts=True)
    common = sizes[int(np.argmax(counts))]
    formats = collections.Counter(_FORMAT_NAMES[e] for e in exts)
    name = root.rstrip("/").rsplit("/", 1)[-1]
    return RawData(
        name=name, splits=splits, class_names=class_names, encoding="image", fetch=fetch,
        input_shape=[3 if colour.any() else 1, int(common[0]), int(common[1])], dtype="uint8",
        extra={"image_format": next(iter(formats)) if len(formats) == 1 else "mixed",
               "image_formats": dict(sorted(formats.items())),
               "image_size": {"min": [int(v) for v in hw.min(axis=0)], "max": [int(v) for v in hw.max(axis=0)]}},
    )


# ---------------------------------------------------------------------------------------------
# digits (scikit-learn)
# ---------------------------------------------------------------------------------------------

def load_digits(source: str = "", **_: Any) -> RawData:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    # 0..16 grey levels -> 0..255 uint8 images, so digits flow through the image path like MNIST.
    x = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None, :, :]
    return RawData(name="digits", splits={"all": (x, d.target.astype(np.int64))},
                   class_names=[str(int(c)) for c in d.target_names])


# ---------------------------------------------------------------------------------------------
# synthetic data with confusable groups
# ---------------------------------------------------------------------------------------------

def synthetic_config(overrides: Union[None, SyntheticConfig, dict, list, tuple] = None) -> SyntheticConfig:
    """SyntheticConfig from `k=v` strings or a dict; UserError naming any bad key or value."""
    from pydantic import ValidationError

    if isinstance(overrides, SyntheticConfig):
        return overrides
    if not overrides:
        return SyntheticConfig()
    if isinstance(overrides, dict):
        raw = dict(overrides)
    else:
        pairs, problems = parse_overrides(list(overrides))
        if problems:
            raise UserError("--synthetic: " + "; ".join(problems))
        raw = dict(pairs)
    valid = sorted(SyntheticConfig.model_fields)
    unknown = [k for k in raw if k not in valid]
    if unknown:
        raise UserError(f"synthetic.{unknown[0]}: unknown key; valid keys: {', '.join(valid)}")
    try:
        return SyntheticConfig.model_validate(raw)
    except ValidationError as e:
        msgs = [f"synthetic.{'.'.join(str(p) for p in err['loc'])}: value {err.get('input')!r} is invalid: {err['msg']}"
                for err in e.errors()]
        raise UserError("; ".join(msgs)) from None


# Geometry of the generator (noise std 1 = one unit). Chosen by measurement
# (12 classes, 4 groups, 6000 train, dim 64, MLP 256x256, 10 epochs): the generalist reaches ~67 %
# test accuracy (chance 8 %) with every error inside a group, the Bayes rule ~83 %, and a specialist
# fine-tuned on one group's data gains ~4 points there over the generalist.
_GROUP_RADIUS = 6.0      # distance of each group centre from the origin
_SUBSPACE_DIMS = 3       # a group's classes differ only inside the group's own 3-d subspace
_MODES_PER_CLASS = 8     # each class is a mixture of blobs interleaved with its group mates'
_MODE_BOX = 2.0          # blob centres drawn uniformly in [-box, box]^3 of the group subspace
_MODE_SPREAD = 0.25      # blob std inside the subspace, times `difficulty`
_BACKGROUND_NOISE = 0.3  # isotropic noise std in all dimensions
# Samples per generation block. Each block has its own seed (from the config's seed, the split and
# the block's index), so the generator streams in constant memory and the data do not depend on
# the shard size.
SYNTHETIC_BLOCK = 4096
_SPLIT_ID = {"train": 1, "test": 2}


class SyntheticGenerator:
    """Seeded float32 vectors with real confusable structure, generated block by block.

    Classes are split into `num_groups` groups (a seeded assignment, so groups are not contiguous
    index ranges). Each group has a centre far from the others and its own random 3-d subspace;
    each class of the group is a mixture of a few Gaussian blobs placed at random in that subspace,
    interleaved with the blobs of its group mates. Telling groups apart is easy (distant centres);
    telling classes apart within a group needs a non-linear boundary among overlapping blobs, whose
    overlap grows with `difficulty`. A generalist therefore errs almost only within groups, and a
    specialist that spends its capacity on one group's boundary can beat it there.

    `blocks(split)` yields (x (n, dim) float32, y (n,) int64) for `SYNTHETIC_BLOCK` samples at a
    time; `labels(split)` yields only the labels, cheaply (they have their own seed per block), so
    a first pass can count classes without generating inputs. Classes are balanced over a split.
    """

    def __init__(self, cfg: SyntheticConfig):
        C, G, D = cfg.num_classes, cfg.num_groups, cfg.dim
        if G > C:
            raise UserError(f"synthetic.num_groups: {G} groups for {C} classes; need num_groups <= num_classes")
        self.cfg = cfg
        rng = np.random.default_rng(np.random.SeedSequence(entropy=cfg.seed, spawn_key=(0,)))
        self.groups = sorted((sorted(int(c) for c in g) for g in np.array_split(rng.permutation(C), G)),
                             key=lambda g: g[0])
        self.group_of = np.empty(C, dtype=np.int64)
        for gi, g in enumerate(self.groups):
            self.group_of[g] = gi
        k = self.k = min(_SUBSPACE_DIMS, D)
        centres = rng.standard_normal((G, D))
        self.centres = centres * (_GROUP_RADIUS / np.linalg.norm(centres, axis=1, keepdims=True))
        self.bases = np.stack([np.linalg.qr(rng.standard_normal((D, k)))[0] for _ in range(G)])  # (G, D, k)
        self.modes = rng.uniform(-_MODE_BOX, _MODE_BOX, size=(C, _MODES_PER_CLASS, k))
        self.spread = _MODE_SPREAD * cfg.difficulty

    def size(self, split: str) -> int:
        return int(self.cfg.train if split == "train" else self.cfg.test)

    def _seeds(self, split: str, b: int) -> list[np.random.SeedSequence]:
        return np.random.SeedSequence(entropy=self.cfg.seed, spawn_key=(_SPLIT_ID[split], b)).spawn(2)

    def _block_labels(self, split: str, b: int, seed: np.random.SeedSequence) -> np.ndarray:
        lo = b * SYNTHETIC_BLOCK
        n = min(SYNTHETIC_BLOCK, self.size(split) - lo)
        return np.random.default_rng(seed).permutation((np.arange(lo, lo + n) % self.cfg.num_classes).astype(np.int64))

    def num_blocks(self, split: str) -> int:
        return -(-self.size(split) // SYNTHETIC_BLOCK)

    def labels(self, split: str) -> Iterator[np.ndarray]:
        for b in range(self.num_blocks(split)):
            yield self._block_labels(split, b, self._seeds(split, b)[0])

    def blocks(self, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        D = self.cfg.dim
        for b in range(self.num_blocks(split)):
            label_seed, input_seed = self._seeds(split, b)
            y = self._block_labels(split, b, label_seed)
            r = np.random.default_rng(input_seed)
            n = len(y)
            m = r.integers(0, _MODES_PER_CLASS, size=n)
            z = self.modes[y, m] + self.spread * r.standard_normal((n, self.k))
            x = _BACKGROUND_NOISE * r.standard_normal((n, D))
            g = self.group_of[y]
            for gi in range(len(self.groups)):  # per group: one (n_g, k) @ (k, D) product, no (n, D, k) temporary
                rows = np.flatnonzero(g == gi)
                if len(rows):
                    x[rows] += self.centres[gi] + z[rows] @ self.bases[gi].T
            yield x.astype(np.float32), y


def make_synthetic(cfg: SyntheticConfig) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[list[int]]]:
    """The whole synthetic dataset in memory: ({"train", "test"}: (x, y)), groups. For tests and
    small experiments; `ingest` streams the same samples block by block instead."""
    gen = SyntheticGenerator(cfg)
    out = {}
    for split in ("train", "test"):
        xs, ys = zip(*gen.blocks(split))
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return out, gen.groups


def load_synthetic(source: str = "", synthetic: Optional[SyntheticConfig] = None, **_: Any) -> RawData:
    cfg = synthetic or SyntheticConfig()
    gen = SyntheticGenerator(cfg)
    return RawData(
        name=f"synthetic-{cfg.num_classes}c-{cfg.num_groups}g", splits={},
        class_names=[f"class_{i:02d}" for i in range(cfg.num_classes)], class_groups=gen.groups,
        extra={"synthetic": cfg.model_dump()}, stream=gen, input_shape=[cfg.dim], dtype="float32",
    )


LOADERS = {"idx": load_idx, "cifar": load_cifar, "npz": load_npz, "folder": load_folder,
           "digits": load_digits, "synthetic": load_synthetic}


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------

def _take_count(n: int, fraction: float) -> int:
    """How many of a class's `n` samples a stratified carve takes (a singleton stays)."""
    if n <= 1:
        return 0
    return min(max(int(round(fraction * n)), 1), n - 1)


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, taken) sorted index arrays; about `fraction` of every class is taken (seeded).

    A class with a single sample stays in `kept`.
    """
    rng = np.random.default_rng(seed)
    taken = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        taken.append(rng.permutation(idx)[:_take_count(len(idx), fraction)])
    take = np.sort(np.concatenate(taken)) if taken else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[take] = False
    return np.flatnonzero(mask), take


class StreamingCarve:
    """The stratified seeded carve of `stratified_split`, for a stream of label blocks.

    Given the class counts of the whole stream (a first pass over labels only), it takes exactly
    `_take_count(n_c, fraction)` samples of every class c, each subset of that size equally likely,
    holding only per-class counters: in each block, the number taken from class c is drawn from the
    hypergeometric law of "how many of the still-to-take fall in this block", then that many of the
    block's class-c samples are chosen at random. Same seed and same blocks, same choice.
    """

    def __init__(self, class_counts: np.ndarray, fraction: float, seed: int):
        counts = np.asarray(class_counts, dtype=np.int64)
        self.remaining = counts.copy()
        self.to_take = np.array([_take_count(int(n), fraction) for n in counts], dtype=np.int64)
        self.targets = self.to_take.copy()
        self.rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(7,)))

    def __call__(self, y: np.ndarray) -> np.ndarray:
        """Boolean mask over the block: True where the sample is carved out."""
        mask = np.zeros(len(y), dtype=bool)
        for c in np.unique(y):
            pos = np.flatnonzero(y == c)
            b, rem, want = len(pos), int(self.remaining[c]), int(self.to_take[c])
            if b > rem:
                raise RuntimeError(f"StreamingCarve: class {c} has more samples than its count says")
            k = int(self.rng.hypergeometric(want, rem - want, b)) if want and rem > want else (b if want else 0)
            if k:
                mask[pos[self.rng.choice(b, size=k, replace=False)]] = True
            self.to_take[c] -= k
            self.remaining[c] -= b
        return mask


def split_indices(labels: dict[str, np.ndarray], val_fraction: float, seed: int,
                  test_fraction: float = DEFAULT_TEST_FRACTION) -> dict[str, tuple[str, np.ndarray]]:
    """train/val/test as (source split, indices into it): carve test (sources with one pool) and
    val (sources without) from train, stratified and seeded; then shuffle train and val with the
    seed. Test keeps the source order. Only labels and indices are held, never inputs."""
    out: dict[str, tuple[str, np.ndarray]] = {}
    if "all" in labels:
        keep, take = stratified_split(labels["all"], test_fraction, seed + 1)
        out["train"], out["test"] = ("all", keep), ("all", take)
    else:
        out["train"], out["test"] = ("train", np.arange(len(labels["train"]))), ("test", np.arange(len(labels["test"])))
        if "val" in labels:
            out["val"] = ("val", np.arange(len(labels["val"])))
    if "val" not in out:
        src, idx = out["train"]
        keep, take = stratified_split(labels[src][idx], val_fraction, seed)
        out["train"], out["val"] = (src, idx[keep]), (src, idx[take])
    rng = np.random.default_rng(seed)
    for s in ("train", "val"):
        src, idx = out[s]
        out[s] = (src, idx[rng.permutation(len(idx))])
    return {s: out[s] for s in SPLITS}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

JOURNAL = ".distill-ingest.json"
_OWNER = "pipeline.data.ingest"
# Temp names of `storage.write_bytes_atomic` (mkstemp: ".tmp-" + 8 random chars + "-" + name).
_TMP_RE = re.compile(r"^\.tmp-[A-Za-z0-9_]+-(?:[A-Za-z0-9]+-\d{6}\.tar|" + re.escape(MANIFEST) + "|"
                     + re.escape(JOURNAL) + ")$")


def _list_sizes(uri: str) -> dict[str, int]:
    fs, path = storage.get_fs(uri)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for e in entries:
        name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") != "directory":
            out[name] = int(e.get("size") or 0)
    return out


def shards_present(out: str, manifest: dict) -> bool:
    sizes = _list_sizes(out)
    for info in manifest.get("splits", {}).values():
        for s in info.get("shards", []):
            if s["path"] not in sizes or ("size" in s and sizes[s["path"]] != s["size"]):
                return False
    return True


def _normalise_source(source: str, fmt: str) -> str:
    if fmt in ("digits", "synthetic"):
        return ""
    return source if storage.is_remote(source) else os.path.abspath(source)


def _check_arrays(raw: RawData, name: str) -> tuple[list[int], str]:
    """Input shape and dtype shared by every split of an in-memory source; labels in range."""
    shape, dtype = None, None
    for s, (x, y) in raw.splits.items():
        if x.dtype not in (np.uint8, np.float32):
            raise UserError(f"{name}: split {s} has inputs of dtype {x.dtype}; expected uint8 or float32")
        if shape is None:
            shape, dtype = x.shape[1:], x.dtype
        elif x.shape[1:] != shape or x.dtype != dtype:
            raise UserError(f"{name}: split {s} has inputs {x.dtype}{list(x.shape[1:])} but others have "
                            f"{dtype}{list(shape)}; all splits must match")
    assert shape is not None and dtype is not None
    return [int(v) for v in shape], str(np.dtype(dtype))


def _is_own_manifest(m: Any) -> bool:
    return (isinstance(m, dict) and isinstance(m.get("created_by"), str) and _OWNER in m["created_by"]
            and isinstance(m.get("splits"), dict))


def _own_manifest(out: str) -> Optional[dict]:
    """The manifest distill wrote into `out` earlier, None if there is none; UserError for a
    `manifest.json` that distill did not write (it is never replaced)."""
    muri = storage.join(out, MANIFEST)
    try:
        raw = storage.read_bytes(muri)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    try:
        m = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        m = None
    if not _is_own_manifest(m):
        raise UserError(
            f"{muri}: this {MANIFEST} was not written by `distill data ingest` (it has no created_by "
            f"'... ({_OWNER})'), so ingest will not replace it or touch the files beside it. Ingest into "
            "another (new or empty) folder, or move that file away if the folder is meant for this dataset"
        )
    return m


def _own_journal(out: str) -> set[str]:
    """Shard names an earlier, unfinished ingest into `out` recorded as its own (empty if none)."""
    juri = storage.join(out, JOURNAL)
    try:
        j = json.loads(storage.read_bytes(juri).decode("utf-8"))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return set()
    except (ValueError, UnicodeDecodeError):
        j = None
    if not (isinstance(j, dict) and _OWNER in str(j.get("created_by", "")) and isinstance(j.get("shards"), list)):
        raise UserError(f"{juri}: not the journal `distill data ingest` writes; move it away and ingest again")
    return {str(n) for n in j["shards"]}


def ingest(source: str, out: str, fmt: str, val_fraction: float = 0.1, shard_size: int = 5000,
           seed: int = 0, synthetic_overrides: Union[None, SyntheticConfig, dict, list] = None,
           test_fraction: float = DEFAULT_TEST_FRACTION, progress: bool = True) -> dict:
    """Read `source` in format `fmt` and write shards + manifest.json to `out` (local or s3://).

    Returns the manifest. If `out` already holds a complete dataset ingested with the same
    settings, nothing is written. Raises UserError for bad input (named file, what is wrong, fix).
    Files in `out` that distill did not write are never removed or overwritten.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
    if not 0 < float(val_fraction) < 0.9:
        raise UserError(f"--val-fraction {val_fraction}: must be > 0 and < 0.9")
    if not 0 < float(test_fraction) < 0.9:
        raise UserError(f"test_fraction {test_fraction}: must be > 0 and < 0.9")
    if int(shard_size) < 1:
        raise UserError(f"--shard-size {shard_size}: must be at least 1")
    if fmt != "synthetic" and synthetic_overrides:
        raise UserError("--synthetic settings apply only to --format synthetic")
    syn = synthetic_config(synthetic_overrides) if fmt == "synthetic" else None
    if fmt not in ("digits", "synthetic") and (not source or source == "-"):
        raise UserError(f"SOURCE is empty; --format {fmt} needs the path or URI of the raw data")
    shard_size = int(shard_size)
    params = {"source": _normalise_source(source, fmt), "format": fmt, "val_fraction": float(val_fraction),
              "shard_size": shard_size, "seed": int(seed),
              "test_fraction": float(test_fraction) if fmt in ("digits", "folder") else None,
              "synthetic": syn.model_dump() if syn else None}
    muri = storage.join(out, MANIFEST)
    existing = _own_manifest(out)
    if existing is not None and existing.get("ingest") == params and shards_present(out, existing):
        _log(f"{out} already holds this dataset ({MANIFEST} matches, all shards present); nothing to do")
        return existing
    ours = _own_journal(out)
    if existing is not None:
        ours |= {s["path"] for info in existing["splits"].values() for s in info.get("shards", [])}

    t0 = time.perf_counter()
    raw = LOADERS[fmt](source, synthetic=syn)
    plan = _plan(raw, float(val_fraction), int(seed), float(test_fraction), source or fmt)
    counts = {s: int(plan.class_counts[s].sum()) for s in SPLITS}
    for s in ("train", "test"):
        if counts[s] == 0:
            raise UserError(f"{source or fmt}: the {s} split is empty")
    _log(f"read {raw.name} ({fmt}) in {time.perf_counter() - t0:.1f}s: "
         + ", ".join(f"{s} {counts[s]}" for s in SPLITS))

    planned = [shard_name(s, i) for s in SPLITS for i in range(-(-counts[s] // shard_size))]
    present = _list_sizes(out)
    foreign = [n for n in planned if n in present and n not in ours]
    if foreign:
        raise UserError(
            f"{out}: holds {len(foreign)} shard file(s) that distill did not write (not listed in its "
            f"{MANIFEST}), which this ingest would overwrite: {', '.join(foreign[:10])}"
            f"{' ...' if len(foreign) > 10 else ''}. Ingest into another (new or empty) folder, or move "
            "those files away"
        )
    storage.makedirs(out)
    storage.write_json_atomic(storage.join(out, JOURNAL), {
        "created_by": f"distill {_version()} ({_OWNER})",
        "shards": sorted((ours & set(present)) | set(planned))})
    if existing is not None:  # a manifest must only ever describe complete shards
        storage.remove(muri)
    t1 = time.perf_counter()
    total = len(planned)
    with _Publisher(out, present, total, progress) as pub:
        plan.write(pub, shard_size)
    entries, kept = pub.entries, pub.kept
    num_classes = len(raw.class_names)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": raw.name,
        "num_classes": num_classes,
        "class_names": raw.class_names,
        "class_groups": raw.class_groups,
        "encoding": raw.encoding,
        **raw.extra,
        "input_shape": plan.input_shape,
        "dtype": plan.dtype,
        "source_format": fmt,
        "splits": {
            s: {"num_samples": counts[s],
                "class_counts": [int(v) for v in plan.class_counts[s]],
                "shards": entries[s]}
            for s in SPLITS
        },
        "ingest": params,
        "created_by": f"distill {_version()} ({_OWNER})",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for s in SPLITS:
        assert sum(e["num_samples"] for e in entries[s]) == counts[s], (s, counts[s])
    storage.write_json_atomic(muri, manifest)
    _remove_stale(out, manifest, ours)
    storage.remove(storage.join(out, JOURNAL))
    _log(f"wrote {total - kept} shard(s), kept {kept} already complete, in {time.perf_counter() - t1:.1f}s -> {out}")
    return manifest


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("distill")
    except Exception:  # noqa: BLE001 - running from a source tree without installed metadata
        return "dev"


def _encode(x: Any, y: np.ndarray, keys: list[str]) -> bytes:
    if isinstance(x, ImageBatch):
        return encode_image_shard(x.blobs, x.exts, y, keys)
    return encode_shard(x, y, keys)


class _Publisher:
    """Publishes encoded shards in order, a few at once in threads (disk writes, S3 PUTs), with at
    most `_IN_FLIGHT` shards held; keeps a shard already present with the same bytes (a resumed
    ingest) and records each shard's manifest entry."""

    _IN_FLIGHT = 4

    def __init__(self, out: str, present: dict[str, int], total: int, progress: bool):
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        self.out, self.present = out, present
        self.entries: dict[str, list[dict]] = {s: [] for s in SPLITS}
        self.kept = 0
        self.pool = ThreadPoolExecutor(max_workers=self._IN_FLIGHT, thread_name_prefix="distill-put")
        self.pending: collections.deque = collections.deque()
        self.bar = tqdm(total=total, desc="ingest", unit="shard", file=sys.stderr, disable=not progress)

    def _put(self, uri: str, name: str, data: bytes, sha: str) -> bool:
        if self.present.get(name) == len(data):
            try:
                if storage.sha256_file(uri) == sha:
                    return False
            except FileNotFoundError:
                pass
        storage.write_bytes_atomic(uri, data)
        return True

    def _settle(self, fut) -> None:
        self.kept += 0 if fut.result() else 1
        self.bar.update(1)

    def submit(self, split: str, x: Any, y: np.ndarray) -> None:
        """Encode and publish the next shard of `split` (samples keyed from the split's running count)."""
        entries = self.entries[split]
        start = sum(e["num_samples"] for e in entries)
        data = _encode(x, y, [sample_key(split, j) for j in range(start, start + len(y))])
        name = shard_name(split, len(entries))
        sha = storage.sha256_bytes(data)
        entries.append({"path": name, "num_samples": int(len(y)), "sha256": sha, "size": len(data)})
        self.pending.append(self.pool.submit(self._put, storage.join(self.out, name), name, data, sha))
        while len(self.pending) >= self._IN_FLIGHT or (self.pending and self.pending[0].done()):
            self._settle(self.pending.popleft())

    def __enter__(self) -> "_Publisher":
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        try:
            if exc_type is None:
                while self.pending:
                    self._settle(self.pending.popleft())
        finally:
            for fut in self.pending:
                fut.cancel()
            self.pool.shutdown(wait=True)
            self.bar.close()


class _Sink:
    """Fills the shards of one split from blocks of any size: a shard is encoded and published as
    soon as it is full, so at most one shard's worth of samples waits here."""

    def __init__(self, pub: _Publisher, split: str, shard_size: int):
        self.pub, self.split, self.size = pub, split, shard_size
        self.xs: list[np.ndarray] = []
        self.ys: list[np.ndarray] = []
        self.n = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if len(y):
            self.xs.append(x)
            self.ys.append(y)
            self.n += len(y)
        while self.n >= self.size:
            self._flush(self.size)

    def _flush(self, n: int) -> None:
        x, y = np.concatenate(self.xs), np.concatenate(self.ys)
        self.pub.submit(self.split, x[:n], y[:n])
        self.xs, self.ys = ([x[n:]], [y[n:]]) if len(y) > n else ([], [])
        self.n = len(y) - n

    def close(self) -> None:
        if self.n:
            self._flush(self.n)


@dataclass
class _Plan:
    """What will be written: per split its class counts, and how to produce its shards in order."""

    input_shape: list[int]
    dtype: str
    class_counts: dict[str, np.ndarray]
    write: Callable[[_Publisher, int], None]


def _plan(raw: RawData, val_fraction: float, seed: int, test_fraction: float, where: str) -> _Plan:
    C = len(raw.class_names)
    if raw.stream is not None:
        return _stream_plan(raw, val_fraction, seed)
    for s, (_, y) in raw.splits.items():
        _check_labels(y, C, f"{where} ({s} split)")
    if raw.fetch is None:
        input_shape, dtype = _check_arrays(raw, where)
    else:
        input_shape, dtype = list(raw.input_shape), raw.dtype
    parts = split_indices({s: y for s, (_, y) in raw.splits.items()}, val_fraction, seed, test_fraction)
    class_counts = {s: np.bincount(raw.splits[src][1][idx], minlength=C) for s, (src, idx) in parts.items()}

    def write(pub: _Publisher, shard_size: int) -> None:
        jobs = [(s, lo) for s in SPLITS for lo in range(0, len(parts[s][1]), shard_size)]

        def produce(job: tuple[str, int]) -> tuple[Any, np.ndarray]:
            s, lo = job
            src, idx = parts[s]
            chunk = idx[lo:lo + shard_size]
            x_src, y_src = raw.splits[src]
            return (raw.fetch(x_src[chunk]) if raw.fetch is not None else x_src[chunk]), y_src[chunk]

        # The next shard is read (files, S3) while this one is encoded and published.
        for (s, _), fut in prefetch(produce, jobs, workers=2, window=2):
            x, y = fut.result()
            pub.submit(s, x, y)

    return _Plan(input_shape, dtype, class_counts, write)


def _stream_plan(raw: RawData, val_fraction: float, seed: int) -> _Plan:
    """A generated source (synthetic): a first pass over labels counts the classes, then one pass
    generates the blocks and carves val from train on the fly (StreamingCarve)."""
    gen, C = raw.stream, len(raw.class_names)
    pool = np.zeros(C, dtype=np.int64)
    for y in gen.labels("train"):
        pool += np.bincount(y, minlength=C)
    test_counts = np.zeros(C, dtype=np.int64)
    for y in gen.labels("test"):
        test_counts += np.bincount(y, minlength=C)
    carve_counts = StreamingCarve(pool, val_fraction, seed).targets
    class_counts = {"train": pool - carve_counts, "val": carve_counts, "test": test_counts}

    def write(pub: _Publisher, shard_size: int) -> None:
        carve = StreamingCarve(pool, val_fraction, seed)
        # Train and val shards fill side by side from one pass over the generated train pool; the
        # manifest lists each split's shards in order, so interleaved publishing is harmless.
        train, val = _Sink(pub, "train", shard_size), _Sink(pub, "val", shard_size)
        for x, y in gen.blocks("train"):
            taken = carve(y)
            train.add(x[~taken], y[~taken])
            val.add(x[taken], y[taken])
        train.close()
        val.close()
        test = _Sink(pub, "test", shard_size)
        for x, y in gen.blocks("test"):
            test.add(x, y)
        test.close()

    return _Plan(list(raw.input_shape), raw.dtype, class_counts, write)


def _remove_stale(out: str, manifest: dict, ours: set[str]) -> None:
    """Delete this project's own shards that the new manifest no longer lists (from the previous
    manifest or an unfinished ingest's journal) and temp files of a crashed write. Any other file,
    even one named like a shard, is left alone."""
    keep = {s["path"] for info in manifest["splits"].values() for s in info["shards"]}
    for name in storage.listdir(out):
        stale = name in ours and name not in keep and SHARD_RE.match(name) is not None
        if stale or _TMP_RE.match(name):
            storage.remove(storage.join(out, name))
