"""Overlays: segments tinted and labeled over the original image, pixels outside every segment untouched."""
from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.overlays import render_overlay
from pipeline.rle import encode_mask


def test_overlay_tints_only_segment_pixels_and_keeps_the_image_size():
    image = Image.fromarray(np.full((40, 60, 3), 128, np.uint8))
    mask = np.zeros((40, 60), bool)
    mask[10:30, 5:25] = True
    encoded = encode_mask(mask)
    segment = {"rle_size": encoded["size"], "rle_counts": encoded["counts"], "label": "square", "score": 0.9}
    overlay = np.asarray(render_overlay(image, [segment]))
    assert overlay.shape == (40, 60, 3)
    # The label is drawn from the mask's middle row (20) down; rows above and below stay as they were.
    assert (overlay[:10] == 128).all() and (overlay[35:] == 128).all()
    assert (overlay[10:19, 5:25] != 128).any(axis=-1).all(), "segment pixels are tinted"
    assert (overlay[10:19, 25:] == 128).all(), "pixels beside the segment are not"


def test_segments_of_another_size_are_skipped_not_drawn_wrong():
    image = Image.fromarray(np.full((10, 10, 3), 50, np.uint8))
    encoded = encode_mask(np.ones((12, 12), bool))
    overlay = render_overlay(image, [{"rle_size": encoded["size"], "rle_counts": encoded["counts"], "label": "x",
                                      "score": None}])
    assert (np.asarray(overlay) == 50).all()
