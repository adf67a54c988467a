"""COCO RLE on the host: strings, areas and boxes from column-major run lengths, by pycocotools.

COCO's uncompressed RLE lists run lengths over the mask read column by column (Fortran order), the first
run counting zeros (possibly 0 of them). The model stage computes those runs where the masks are; here
pycocotools compresses them into its string form and derives area and bbox, never seeing a dense mask.
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask

__all__ = ["encode_run_lengths", "encode_mask", "mask_run_lengths"]


def encode_run_lengths(run_lengths: list[np.ndarray], *, height: int, width: int) -> list[dict]:
    """Masks of one image given as column-major run lengths (first run = zeros) -> per mask
    {'size': [h, w], 'counts': compressed COCO RLE str, 'area': int, 'bbox': [x, y, w, h]}."""
    if not run_lengths:
        return []
    rles = coco_mask.frPyObjects([{"size": [height, width], "counts": counts} for counts in run_lengths],
                                 height, width)
    areas = coco_mask.area(rles)
    boxes = coco_mask.toBbox(rles)
    return [{"size": [height, width], "counts": rle["counts"].decode("ascii"), "area": int(area),
             "bbox": [float(v) for v in box]} for rle, area, box in zip(rles, areas, boxes)]


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
