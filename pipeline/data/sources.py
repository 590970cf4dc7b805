"""The raw-data formats of `distill data ingest` that read files: one loader per `--format`, each
returning a `RawData` (in-memory arrays or a list of image files read per shard), which
`pipeline.data.ingest` splits and writes as shards. The generated format is `pipeline.data.synthetic`.
See `pipeline.data.ingest` for the formats and docs/data.md.
"""
from __future__ import annotations

import collections
import gzip
import io
import os
import pickle
import re
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from pipeline import storage
from pipeline.data.shards import prefetch
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
        shown = "\n  ".join(f"{u}: {why}" for u, why in sorted(bad))  # every one, one per line
        raise UserError(f"{source}: {len(bad)} of {n} image file(s) cannot be read or decoded:\n  {shown}\n"
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


# Every --format except synthetic, which lives in `pipeline.data.synthetic` (a generator, not a
# reader of files); `pipeline.data.ingest.LOADERS` joins the two.
FILE_LOADERS = {"idx": load_idx, "cifar": load_cifar, "npz": load_npz, "folder": load_folder,
                "digits": load_digits}
