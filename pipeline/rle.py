"""COCO RLE on the host: strings, areas and boxes from column-major run lengths, never from a dense mask.

COCO's uncompressed RLE lists run lengths over the mask read column by column (Fortran order), the first
run counting zeros (possibly 0 of them). The model stage computes those runs where the masks are (with each
mask's area and box) and packs them into 16-bit words for the trip through the object store
(`pack_run_lengths`); here pycocotools compresses them into its string form, never seeing a dense mask.
`compress_run_lengths` also gives pycocotools' own area and box, for readers without the model stage's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pycocotools import mask as coco_mask

from pipeline.records import binary_column_views

__all__ = ["CompressedMasks", "rle_strings", "compress_run_lengths", "encode_run_lengths", "encode_mask",
           "mask_run_lengths", "pack_run_lengths", "unpack_run_lengths", "run_lengths_column"]

# A count that does not fit 16 bits is written as ESCAPE, count >> 15, count & 0x7FFF: neither payload word can
# equal ESCAPE (counts stay below 2**30, i.e. images below a billion pixels), so escapes are found without
# scanning. Long runs are rare (a run longer than 65534 pixels is mostly the background before or after a mask),
# so most masks pack to half size.
_ESCAPE = 0xFFFF
_MAX_COUNT = 2 ** 30


def pack_run_lengths(counts: np.ndarray) -> bytes:
    """Run lengths (any unsigned/int dtype, < 2**30) -> 16-bit words, long counts escaped."""
    counts = np.asarray(counts, dtype=np.uint32)
    words = counts.astype(np.uint16)  # long counts wrap here; they are overwritten below
    long_run = np.flatnonzero(counts >= _ESCAPE)
    if long_run.size == 0:
        return words.tobytes()
    long_counts = counts[long_run]
    if int(long_counts.max()) >= _MAX_COUNT:
        raise ValueError(f"a run of {int(long_counts.max())} pixels is too long to pack (limit {_MAX_COUNT - 1})")
    words[long_run] = _ESCAPE
    payload = np.empty((long_run.size, 2), dtype=np.uint16)  # per long count: its high and low 15 bits
    payload[:, 0] = long_counts >> 15
    payload[:, 1] = long_counts & 0x7FFF
    # Equal insertion indices keep their order, so each escape is followed by its high word, then its low one.
    return np.insert(words, np.repeat(long_run + 1, 2), payload.ravel()).tobytes()


def unpack_run_lengths(packed: np.ndarray | bytes) -> np.ndarray:
    """`pack_run_lengths`' bytes (or a uint8 view of them) -> uint32 run lengths."""
    words = np.frombuffer(packed, dtype=np.uint16) if isinstance(packed, bytes) else packed.view(np.uint16)
    escaped = np.flatnonzero(words == _ESCAPE)
    if escaped.size == 0:
        return words.astype(np.uint32)
    long_counts = (words[escaped + 1].astype(np.uint32) << 15) | words[escaped + 2]
    counts = np.delete(words, np.concatenate((escaped + 1, escaped + 2))).astype(np.uint32)
    counts[escaped - 2 * np.arange(escaped.size)] = long_counts  # each escape, once the payloads before it are gone
    return counts


def run_lengths_column(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray | None]:
    """A SEGMENTED table's `run_lengths` column -> each row's uint32 run lengths (None for error rows)."""
    return [None if view is None else unpack_run_lengths(view) for view in binary_column_views(column)]


@dataclass
class CompressedMasks:
    """Masks of one image as pycocotools gives them, one entry per mask."""

    counts: list[bytes]  # compressed COCO RLE (ASCII)
    area: np.ndarray  # (masks,) integer pixels
    bbox: np.ndarray  # (masks, 4) float64, COCO [x, y, width, height]


def rle_strings(run_lengths: list[np.ndarray], *, height: int, width: int) -> list[bytes]:
    """Masks of one image given as column-major run lengths (first run = zeros) -> compressed COCO RLE strings."""
    if not run_lengths:
        return []
    return [rle["counts"] for rle in coco_mask.frPyObjects(
        [{"size": [height, width], "counts": counts} for counts in run_lengths], height, width)]


def compress_run_lengths(run_lengths: list[np.ndarray], *, height: int, width: int) -> CompressedMasks:
    """Masks of one image given as column-major run lengths (first run = zeros) -> RLE strings, areas, boxes."""
    if not run_lengths:
        return CompressedMasks(counts=[], area=np.zeros(0, np.uint32), bbox=np.zeros((0, 4)))
    counts = rle_strings(run_lengths, height=height, width=width)
    # A mask's area is the sum of its odd runs, as pycocotools' own `area` computes it, but without decoding the
    # strings back first (that decoding is most of its cost).
    area = np.array([runs[1::2].sum() for runs in run_lengths], dtype=np.uint32)
    bbox = coco_mask.toBbox([{"size": [height, width], "counts": string} for string in counts])
    return CompressedMasks(counts=counts, area=area, bbox=bbox)


def encode_run_lengths(run_lengths: list[np.ndarray], *, height: int, width: int) -> list[dict]:
    """`compress_run_lengths` as one dict per mask:
    {'size': [h, w], 'counts': compressed COCO RLE str, 'area': int, 'bbox': [x, y, w, h]}."""
    masks = compress_run_lengths(run_lengths, height=height, width=width)
    return [{"size": [height, width], "counts": counts.decode("ascii"), "area": area, "bbox": box}
            for counts, area, box in zip(masks.counts, masks.area.tolist(), masks.bbox.tolist())]


def mask_run_lengths(mask: np.ndarray) -> np.ndarray:
    """A dense (height, width) mask -> its column-major run lengths, first run counting zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    lengths = np.diff(bounds)
    if flat.size and flat[0]:
        lengths = np.concatenate(([0], lengths))
    return lengths.astype(np.uint32)


def encode_mask(mask: np.ndarray) -> dict:
    """A dense (height, width) mask -> as `encode_run_lengths` gives it (for readers holding dense masks)."""
    height, width = mask.shape
    return encode_run_lengths([mask_run_lengths(mask)], height=height, width=width)[0]
