"""Batching of segmentation training items of different sizes."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["collate_segmentation_batch"]


def collate_segmentation_batch(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pads every item to the largest height and width of the batch (bottom/right, zeros).

    Returns {"pixel_values": (B, 3, H, W) float, "pixel_mask": (B, H, W) int64 (1 = real pixel),
    "mask_labels": list of (N_i, H, W) float, "class_labels": list of (N_i,) int64, "image_ids": list[int]}.
    Target masks stay a list because images hold different numbers of segments; their padding is background.
    """
    if not samples:
        raise ValueError("collate_segmentation_batch got an empty batch.")
    height = max(sample["pixel_values"].shape[-2] for sample in samples)
    width = max(sample["pixel_values"].shape[-1] for sample in samples)

    def pad(tensor: torch.Tensor) -> torch.Tensor:
        return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]))

    return {
        "pixel_values": torch.stack([pad(sample["pixel_values"]) for sample in samples]),
        "pixel_mask": torch.stack([pad(sample["pixel_mask"].to(torch.int64)) for sample in samples]),
        "mask_labels": [pad(sample["mask_labels"].to(torch.float32)) for sample in samples],
        "class_labels": [sample["class_labels"].to(torch.int64) for sample in samples],
        "image_ids": [int(sample["image_id"]) for sample in samples],
    }
