"""Decode + preprocess actors: image bytes -> upright RGB -> the checkpoint's own processor -> pixel values.

Each image is processed on its own, so it is never padded here: its pixel values are exactly what
single-image inference feeds the model. Batching happens later, and only among images whose processed
shapes are equal (see `pipeline.inference`), because the model ignores `pixel_mask` and padding would
change a small image's result.
"""
from __future__ import annotations

import pyarrow as pa

from pipeline.checkpoint import load_processor, localize_checkpoint
from pipeline.decode import DEFAULT_MAX_IMAGE_PIXELS, decode_image
from pipeline.progress import report_progress
from pipeline.records import NO_ERROR_COLUMNS, PREPROCESSED_SCHEMA, StageError, pack_array
from pipeline.storage import StorageConfig

__all__ = ["PreprocessStage", "preprocess_image"]


def preprocess_image(processor, image):
    """One RGB image -> float32 pixel values (3, H', W') as the processor makes them, unpadded."""
    encoded = processor(images=[image], return_tensors="pt")
    return encoded["pixel_values"][0].float().numpy()  # (3, H', W')


class PreprocessStage:
    """Ray Data actor: FETCHED rows -> PREPROCESSED rows; failures become error rows ('decode'/'preprocess')."""

    def __init__(self, *, model_uri: str, storage: StorageConfig,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, tracker=None) -> None:
        self._processor = load_processor(localize_checkpoint(model_uri, storage))
        self._max_image_pixels = max_image_pixels
        self._tracker = tracker

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._process_row(row) for row in batch.to_pylist()]
        report_progress(self._tracker, "preprocess", len(rows))
        return pa.Table.from_pylist(rows, schema=PREPROCESSED_SCHEMA)

    def _process_row(self, row: dict) -> dict:
        out = {"image_uri": row["image_uri"], "image_id": row["image_id"], "height": None, "width": None,
               "pixel_values": None, "pixel_shape": None}
        previous_error = StageError.from_row(row)
        if previous_error is not None:
            return {**out, **previous_error.as_columns()}
        try:
            image = decode_image(row["data"], max_pixels=self._max_image_pixels)
        except Exception as error:  # noqa: BLE001 - every failure becomes that image's error row
            return {**out, **StageError.from_exception("decode", error).as_columns()}
        out["width"], out["height"] = image.size
        try:
            pixel_bytes, pixel_shape = pack_array(preprocess_image(self._processor, image))
        except Exception as error:  # noqa: BLE001
            return {**out, **StageError.from_exception("preprocess", error).as_columns()}
        return {**out, "pixel_values": pixel_bytes, "pixel_shape": pixel_shape, **NO_ERROR_COLUMNS}
