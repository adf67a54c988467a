"""Training augmentation applied to an image and its segment-id map together, so masks stay aligned.

The image is resized bilinearly, the id map with nearest neighbour (ids are labels, never blended); both are
cropped at the same place and flipped together.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["ScaleCropFlip", "augmentation_rng"]


def augmentation_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample: depends only on (seed, epoch, index), not on which worker loads it."""
    return np.random.default_rng([seed, epoch, index])


@dataclass(frozen=True)
class ScaleCropFlip:
    """Random scale, then a random crop, then a random horizontal flip.

    Attributes:
        min_scale, max_scale: the image side lengths are multiplied by a factor drawn uniformly from this range.
        crop_size: (height, width) of the crop taken from the scaled image; a scaled image smaller than the crop
            is kept whole along that side (never padded). None: no crop.
        flip_probability: chance of a left-right mirror.
        seed: base seed; each sample's draws come from `augmentation_rng(seed, epoch, index)`.
    """

    min_scale: float = 0.5
    max_scale: float = 2.0
    crop_size: tuple[int, int] | None = None
    flip_probability: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"ScaleCropFlip needs 0 < min_scale <= max_scale, got {self.min_scale}, "
                             f"{self.max_scale}.")
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"ScaleCropFlip flip_probability must lie in [0, 1], got {self.flip_probability}.")
        if self.crop_size is not None and min(self.crop_size) < 1:
            raise ValueError(f"ScaleCropFlip crop_size must be positive (height, width), got {self.crop_size}.")

    def __call__(self, image: np.ndarray, segment_map: np.ndarray, *, epoch: int = 0, index: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Augments `image` (H, W, 3) uint8 and `segment_map` (H, W) integer ids alike.

        Returns the new image (H', W', 3) uint8 and map (H', W') with the map's dtype; no id is invented.
        """
        if image.shape[:2] != segment_map.shape:
            raise ValueError(f"ScaleCropFlip got an image of size {image.shape[:2]} but a segment map of size "
                             f"{segment_map.shape}; they must match.")
        rng = augmentation_rng(self.seed, epoch, index)
        height, width = segment_map.shape
        scale = rng.uniform(self.min_scale, self.max_scale)
        scaled_height, scaled_width = max(1, round(height * scale)), max(1, round(width * scale))
        image = np.asarray(Image.fromarray(image).resize((scaled_width, scaled_height), Image.Resampling.BILINEAR))
        segment_map = _resize_nearest(segment_map, scaled_height, scaled_width)

        if self.crop_size is not None:
            crop_height, crop_width = min(self.crop_size[0], scaled_height), min(self.crop_size[1], scaled_width)
            top = int(rng.integers(0, scaled_height - crop_height + 1))
            left = int(rng.integers(0, scaled_width - crop_width + 1))
            image = image[top:top + crop_height, left:left + crop_width]
            segment_map = segment_map[top:top + crop_height, left:left + crop_width]

        if rng.random() < self.flip_probability:
            image, segment_map = image[:, ::-1], segment_map[:, ::-1]
        return np.ascontiguousarray(image), np.ascontiguousarray(segment_map)


def _resize_nearest(segment_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an integer map, sampling at pixel centres (same rule as PIL's NEAREST)."""
    source_height, source_width = segment_map.shape
    rows = np.minimum(((np.arange(height) + 0.5) * source_height / height).astype(np.int64), source_height - 1)
    columns = np.minimum(((np.arange(width) + 0.5) * source_width / width).astype(np.int64), source_width - 1)
    return segment_map[rows[:, None], columns[None, :]]
