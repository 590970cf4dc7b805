"""Raw data -> WebDataset shards + `manifest.json` (`distill data ingest`, and the `data` stage).

One loader per source format returns the splits as in-memory arrays; the rest is shared: checks
(shapes, dtypes, label range), a stratified seeded val split carved from train when the source has
none, a seeded shuffle of train and val (so every shard holds a mix of classes), and the atomic,
resumable write of shards and manifest.

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
  folder     class-per-folder images (PNG/JPEG/BMP via Pillow): `SOURCE/{train,test[,val]}/CLASS/*`,
             or `SOURCE/CLASS/*` (then test is carved like val). Grayscale or RGB; every image must
             have the same size and mode.
  digits     scikit-learn's bundled 8x8 digits (no download); test carved from it.
  synthetic  seeded vectors with confusable class groups (`make_synthetic`), groups in the manifest.

Inputs are stored as uint8 images (N, C, H, W) (models map them to [-1, 1]) or float32 vectors
(N, D) for synthetic data. Sample keys are `{split}_{index:08d}`.

Atomicity and reruns: every shard is published whole (temp file + rename locally, one PUT on S3);
the manifest goes last and is removed first when the folder is being rewritten, so a manifest
always describes complete shards. Shard bytes are deterministic, so a rerun after an interruption
keeps the shards already written (same sha256), writes the rest and never duplicates a sample; a
rerun of a finished ingest with the same settings does nothing.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional, Union

import numpy as np

from pipeline import storage
from pipeline.config import FORMATS, SyntheticConfig, parse_overrides
from pipeline.data.shards import (FORMAT_VERSION, MANIFEST, SHARD_RE, encode_shard, sample_key,
                                  shard_name)
from pipeline.errors import UserError

DEFAULT_TEST_FRACTION = 0.2

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]


@dataclass
class RawData:
    """What a loader returns: splits as arrays plus what the manifest says about the classes."""

    name: str
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # "train", "test", optional "val": (x, y)
    class_names: list[str]
    class_groups: Optional[list[list[int]]] = None
    extra: dict[str, Any] = field(default_factory=dict)  # more manifest keys (e.g. group_names)


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
# folder of images
# ---------------------------------------------------------------------------------------------

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp")


def _read_image(fs, path: str, uri: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with fs.open(path, "rb") as f, Image.open(f) as im:
            im.load()
            mode = "L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
            arr = np.asarray(im.convert(mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{uri}: not a readable image ({e})") from None
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _describe(shape: tuple[int, ...]) -> str:
    return f"{shape[2]}x{shape[1]} {'grayscale' if shape[0] == 1 else 'RGB'}"


def load_folder(source: str, **_: Any) -> RawData:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise UserError("the folder format reads images with Pillow, which is not installed: pip install pillow") from None
    if not storage.exists(source) or not storage.isdir(source):
        raise UserError(f"{source}: no such folder (folder format expects SOURCE/train/CLASS/*.png and "
                        "SOURCE/test/CLASS/*.png, or SOURCE/CLASS/*.png)")
    fs, root = storage.get_fs(source)
    top = [n for n in storage.listdir(source) if not n.startswith(".")]
    if "train" in top:
        if "test" not in top:
            raise UserError(f"{source}: has train/ but no test/; add test/CLASS/... or put class folders at the top")
        split_dirs = {s: storage.join(source, s) for s in ("train", "val", "test") if s in top}
    else:
        split_dirs = {"all": source}
    class_names = sorted(n for n in storage.listdir(split_dirs.get("train", source))
                         if not n.startswith(".") and storage.isdir(storage.join(split_dirs.get("train", source), n)))
    if not class_names:
        raise UserError(f"{split_dirs.get('train', source)}: no class folders found (expected one folder per class)")
    index = {c: i for i, c in enumerate(class_names)}
    first: Optional[tuple[tuple[int, ...], str]] = None
    splits = {}
    for split, folder in split_dirs.items():
        xs, ys = [], []
        for cname in storage.listdir(folder):
            cdir = storage.join(folder, cname)
            if cname.startswith(".") or not storage.isdir(cdir):
                continue
            if cname not in index:
                raise UserError(f"{cdir}: class '{cname}' does not exist in {split_dirs.get('train', source)}; "
                                "every split must use the training classes")
            files = sorted(p for p in fs.find(storage.get_fs(cdir)[1]) if p.lower().endswith(_IMAGE_EXT))
            if not files and split in ("train", "all"):
                raise UserError(f"{cdir}: no images ({', '.join(_IMAGE_EXT)}) in this class folder")
            for p in files:
                uri = p if not storage.is_remote(source) else f"{source.split('://', 1)[0]}://{p}"
                img = _read_image(fs, p, uri)
                if first is None:
                    first = (img.shape, uri)
                elif img.shape != first[0]:
                    raise UserError(f"{uri}: image is {_describe(img.shape)} but {first[1]} is "
                                    f"{_describe(first[0])}; all images must share one size and mode "
                                    "(resize/convert them first)")
                xs.append(img)
                ys.append(index[cname])
        if not xs:
            raise UserError(f"{folder}: no images found")
        splits[split] = (np.stack(xs), np.asarray(ys, dtype=np.int64))
    name = root.rstrip("/").rsplit("/", 1)[-1]
    return RawData(name=name, splits=splits, class_names=class_names)


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


def make_synthetic(cfg: SyntheticConfig) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[list[int]]]:
    """Seeded float32 vectors with real confusable structure; returns ({"train", "test"}, groups).

    Classes are split into `num_groups` groups (a seeded assignment, so groups are not contiguous
    index ranges). Each group has a centre far from the others and its own random 3-d subspace;
    each class of the group is a mixture of a few Gaussian blobs placed at random in that subspace,
    interleaved with the blobs of its group mates. Telling groups apart is easy (distant centres);
    telling classes apart within a group needs a non-linear boundary among overlapping blobs, whose
    overlap grows with `difficulty`. A generalist therefore errs almost only within groups, and a
    specialist that spends its capacity on one group's boundary can beat it there.
    """
    C, G, D = cfg.num_classes, cfg.num_groups, cfg.dim
    if G > C:
        raise UserError(f"synthetic.num_groups: {G} groups for {C} classes; need num_groups <= num_classes")
    structure, train_seed, test_seed = np.random.SeedSequence(cfg.seed).spawn(3)
    rng = np.random.default_rng(structure)
    groups = sorted((sorted(int(c) for c in g) for g in np.array_split(rng.permutation(C), G)), key=lambda g: g[0])
    group_of = np.empty(C, dtype=np.int64)
    for gi, g in enumerate(groups):
        group_of[g] = gi
    k = min(_SUBSPACE_DIMS, D)
    centres = rng.standard_normal((G, D))
    centres *= _GROUP_RADIUS / np.linalg.norm(centres, axis=1, keepdims=True)
    bases = np.stack([np.linalg.qr(rng.standard_normal((D, k)))[0] for _ in range(G)])  # (G, D, k)
    modes = rng.uniform(-_MODE_BOX, _MODE_BOX, size=(C, _MODES_PER_CLASS, k))
    spread = _MODE_SPREAD * cfg.difficulty

    def sample(n: int, seed: np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng(seed)
        y = r.permutation(np.arange(n) % C)  # balanced classes
        m = r.integers(0, _MODES_PER_CLASS, size=n)
        z = modes[y, m] + spread * r.standard_normal((n, k))
        g = group_of[y]
        x = centres[g] + np.einsum("ndk,nk->nd", bases[g], z) + _BACKGROUND_NOISE * r.standard_normal((n, D))
        return x.astype(np.float32), y.astype(np.int64)

    return {"train": sample(cfg.train, train_seed), "test": sample(cfg.test, test_seed)}, groups


def load_synthetic(source: str = "", synthetic: Optional[SyntheticConfig] = None, **_: Any) -> RawData:
    cfg = synthetic or SyntheticConfig()
    splits, groups = make_synthetic(cfg)
    return RawData(
        name=f"synthetic-{cfg.num_classes}c-{cfg.num_groups}g", splits=splits,
        class_names=[f"class_{i:02d}" for i in range(cfg.num_classes)], class_groups=groups,
        extra={"synthetic": cfg.model_dump()},
    )


LOADERS = {"idx": load_idx, "cifar": load_cifar, "npz": load_npz, "folder": load_folder,
           "digits": load_digits, "synthetic": load_synthetic}


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------

def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, taken) sorted index arrays; about `fraction` of every class is taken (seeded).

    A class with a single sample stays in `kept`.
    """
    rng = np.random.default_rng(seed)
    taken = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n = int(round(fraction * len(idx)))
        n = min(max(n, 1 if len(idx) > 1 else 0), len(idx) - 1)
        taken.append(rng.permutation(idx)[:n])
    take = np.sort(np.concatenate(taken)) if taken else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[take] = False
    return np.flatnonzero(mask), take


def make_splits(raw: RawData, val_fraction: float, seed: int,
                test_fraction: float = DEFAULT_TEST_FRACTION) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train/val/test: carve test (sources with one pool) and val (sources without) from train,
    stratified and seeded; then shuffle train and val with the seed. Test keeps the source order."""
    splits = dict(raw.splits)
    if "all" in splits:
        x, y = splits.pop("all")
        keep, take = stratified_split(y, test_fraction, seed + 1)
        splits["train"], splits["test"] = (x[keep], y[keep]), (x[take], y[take])
    if "val" not in splits:
        x, y = splits["train"]
        keep, take = stratified_split(y, val_fraction, seed)
        splits["train"], splits["val"] = (x[keep], y[keep]), (x[take], y[take])
    rng = np.random.default_rng(seed)
    for s in ("train", "val"):
        x, y = splits[s]
        order = rng.permutation(len(y))
        splits[s] = (x[order], y[order])
    return {s: splits[s] for s in ("train", "val", "test")}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

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


def _check_arrays(splits: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int, name: str) -> tuple[list[int], str]:
    shape, dtype = None, None
    for s, (x, y) in splits.items():
        if x.dtype not in (np.uint8, np.float32):
            raise UserError(f"{name}: split {s} has inputs of dtype {x.dtype}; expected uint8 or float32")
        if shape is None:
            shape, dtype = x.shape[1:], x.dtype
        elif x.shape[1:] != shape or x.dtype != dtype:
            raise UserError(f"{name}: split {s} has inputs {x.dtype}{list(x.shape[1:])} but others have "
                            f"{dtype}{list(shape)}; all splits must match")
        _check_labels(y, num_classes, f"{name} ({s} split)")
        if len(x) == 0 and s in ("train", "test"):
            raise UserError(f"{name}: the {s} split is empty")
    assert shape is not None and dtype is not None
    return [int(v) for v in shape], str(np.dtype(dtype))


def ingest(source: str, out: str, fmt: str, val_fraction: float = 0.1, shard_size: int = 5000,
           seed: int = 0, synthetic_overrides: Union[None, SyntheticConfig, dict, list] = None,
           test_fraction: float = DEFAULT_TEST_FRACTION, progress: bool = True) -> dict:
    """Read `source` in format `fmt` and write shards + manifest.json to `out` (local or s3://).

    Returns the manifest. If `out` already holds a complete dataset ingested with the same
    settings, nothing is written. Raises UserError for bad input (named file, what is wrong, fix).
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
    params = {"source": _normalise_source(source, fmt), "format": fmt, "val_fraction": float(val_fraction),
              "shard_size": int(shard_size), "seed": int(seed),
              "test_fraction": float(test_fraction) if fmt in ("digits", "folder") else None,
              "synthetic": syn.model_dump() if syn else None}
    muri = storage.join(out, MANIFEST)
    existing = None
    try:
        existing = storage.read_json(muri)
    except (FileNotFoundError, ValueError):
        pass
    if isinstance(existing, dict) and existing.get("ingest") == params and shards_present(out, existing):
        _log(f"{out} already holds this dataset ({MANIFEST} matches, all shards present); nothing to do. "
             f"Delete {muri} to ingest again")
        return existing

    t0 = time.perf_counter()
    raw = LOADERS[fmt](source, synthetic=syn)
    splits = make_splits(raw, val_fraction, seed, test_fraction)
    input_shape, dtype = _check_arrays(splits, len(raw.class_names), source or fmt)
    _log(f"read {raw.name} ({fmt}) in {time.perf_counter() - t0:.1f}s: "
         + ", ".join(f"{s} {len(splits[s][1])}" for s in splits))

    if existing is not None:  # a manifest must only ever describe complete shards
        storage.remove(muri)
    t1 = time.perf_counter()
    entries, kept = _write_shards(out, splits, int(shard_size), progress)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": raw.name,
        "num_classes": len(raw.class_names),
        "class_names": raw.class_names,
        "class_groups": raw.class_groups,
        **raw.extra,
        "input_shape": input_shape,
        "dtype": dtype,
        "source_format": fmt,
        "splits": {
            s: {"num_samples": int(len(splits[s][1])),
                "class_counts": np.bincount(splits[s][1], minlength=len(raw.class_names)).tolist(),
                "shards": entries[s]}
            for s in ("train", "val", "test")
        },
        "ingest": params,
        "created_by": f"distill {_version()} (pipeline.data.ingest)",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_json_atomic(muri, manifest)
    _remove_stale(out, manifest)
    n_shards = sum(len(v) for v in entries.values())
    _log(f"wrote {n_shards - kept} shard(s), kept {kept} already complete, in {time.perf_counter() - t1:.1f}s -> {out}")
    return manifest


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("distill")
    except Exception:  # noqa: BLE001 - running from a source tree without installed metadata
        return "dev"


def _write_shards(out: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], shard_size: int,
                  progress: bool) -> tuple[dict[str, list[dict]], int]:
    """Encode and publish every shard; shards already present with the same bytes are kept."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    storage.makedirs(out)
    sizes = _list_sizes(out)
    plan = [(s, i) for s in ("train", "val", "test") for i in range(-(-len(splits[s][1]) // shard_size))]
    entries: dict[str, list[dict]] = {s: [] for s in ("train", "val", "test")}
    kept = 0

    def publish(uri: str, data: bytes, sha: str, name: str) -> bool:
        if sizes.get(name) == len(data):
            try:
                if storage.sha256_file(uri) == sha:
                    return False
            except FileNotFoundError:
                pass
        storage.write_bytes_atomic(uri, data)
        return True

    bar = tqdm(total=len(plan), desc="ingest", unit="shard", file=sys.stderr, disable=not progress)
    # Encoding is CPU work in this thread; publishing (disk, S3 PUTs) overlaps in a few threads,
    # with at most 4 shards in flight to bound memory.
    with bar, ThreadPoolExecutor(max_workers=4, thread_name_prefix="distill-put") as pool:
        pending = []
        for split, i in plan:
            x, y = splits[split]
            lo, hi = i * shard_size, min((i + 1) * shard_size, len(y))
            data = encode_shard(x[lo:hi], y[lo:hi], [sample_key(split, j) for j in range(lo, hi)])
            name = shard_name(split, i)
            sha = storage.sha256_bytes(data)
            entries[split].append({"path": name, "num_samples": hi - lo, "sha256": sha, "size": len(data)})
            pending.append(pool.submit(publish, storage.join(out, name), data, sha, name))
            while len(pending) >= 4 or (pending and pending[0].done()):
                kept += 0 if pending.pop(0).result() else 1
                bar.update(1)
        for fut in pending:
            kept += 0 if fut.result() else 1
            bar.update(1)
    return entries, kept


def _remove_stale(out: str, manifest: dict) -> None:
    """Delete shard files of an earlier, different dataset in `out` and temp files of a crashed write."""
    keep = {s["path"] for info in manifest["splits"].values() for s in info["shards"]}
    for name in storage.listdir(out):
        m = SHARD_RE.match(name)
        stale = m is not None and name not in keep
        tmp = name.startswith(".tmp-") and (name.endswith(".tar") or name.endswith(MANIFEST))
        if stale or tmp:
            storage.remove(storage.join(out, name))
