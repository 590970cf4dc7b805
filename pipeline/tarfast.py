"""Vectorised ustar (tar) and .npy pieces shared by the dataset shards and the soft-target caches.

Both write WebDataset shards whose samples all have the same layout, so N member headers can be
built as one (N, 512) uint8 array, byte for byte what `tarfile` writes for a default `TarInfo`
(mtime 0, mode 0644, uid/gid 0): the fast paths stay readable by every tar/WebDataset reader and
are checked against the `tarfile` reference encoders in the tests.
"""

from __future__ import annotations

import io
import tarfile
from typing import Optional, Sequence

import numpy as np

BLOCK = 512  # tar block size
USTAR_MAGIC = np.frombuffer(b"ustar\x00", dtype=np.uint8)


def padded(size: int) -> int:
    """`size` rounded up to whole tar blocks."""
    return -(-int(size) // BLOCK) * BLOCK


def _template() -> np.ndarray:
    info = tarfile.TarInfo("x")
    info.size = 0
    h = np.frombuffer(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"), dtype=np.uint8).copy()
    h[:100] = 0
    return h


TEMPLATE = _template()


def octal_digits(values: np.ndarray, width: int) -> np.ndarray:
    """(N, width) zero-padded ASCII octal digits of N non-negative integers."""
    powers = 8 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((np.asarray(values, dtype=np.int64)[:, None] // powers[None, :]) % 8 + 48).astype(np.uint8)


def octal_values(fields: np.ndarray) -> Optional[np.ndarray]:
    """Zero-padded ASCII octal numbers, one per row; None unless every byte is an octal digit."""
    d = fields.astype(np.int64) - 48
    if d.size and (d.min() < 0 or d.max() > 7):
        return None
    return d @ (8 ** np.arange(fields.shape[1] - 1, -1, -1, dtype=np.int64))


def headers(names: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(N, 512) ustar headers for member names (N, <=100 uint8, NUL padded) and sizes (N,)."""
    h = np.repeat(TEMPLATE[None, :], len(names), axis=0)
    h[:, :names.shape[1]] = names
    h[:, 124:135] = octal_digits(sizes, 11)
    h[:, 135] = 0
    h[:, 148:156] = 32  # the checksum is computed with its own field as spaces
    h[:, 148:154] = octal_digits(h.sum(axis=1, dtype=np.int64), 6)
    h[:, 154] = 0
    return h


def npy_header(dtype: np.dtype, shape: Sequence[int]) -> bytes:
    """The exact header `np.save` writes for one array of this dtype and shape (format 1.0)."""
    bio = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        bio, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(s) for s in shape)}
    )
    return bio.getvalue()
