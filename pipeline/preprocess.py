"""Decode + resize actors: image bytes -> upright RGB -> resized uint8 pixels, as the checkpoint's processor sizes them.

Only the CPU half of the processor runs here (decode and resize); rescaling and normalising happen on the
model's device (`pipeline.inference`), so a quarter of the bytes crosses the object store (uint8, not
float32) and the CPU does less. Each image is resized on its own and never padded here: padding would
change a small image's result (the model ignores `pixel_mask`); the model stage batches only equal shapes.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline.decode import DEFAULT_MAX_IMAGE_PIXELS, decode_image
from pipeline.model_spec import ModelSpec
from pipeline.progress import report_progress
from pipeline.records import NO_ERROR_COLUMNS, PREPROCESSED_SCHEMA, StageError

__all__ = ["PreprocessStage", "resize_image"]


def resize_image(processor, image) -> torch.Tensor:
    """One RGB image -> uint8 (3, H', W') pixels at the size the processor gives it, not rescaled or padded."""
    return processor.resize_images([image])[0]  # (3, H', W') uint8, maybe a strided (channels-last) view


class PreprocessStage:
    """Ray Data actor: FETCHED rows -> PREPROCESSED rows; failures become error rows ('decode'/'preprocess')."""

    def __init__(self, *, spec: ModelSpec, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 torch_threads: int | None = None, tracker=None) -> None:
        if torch_threads:
            # One image at a time is single-core work (the pool plan counts a core per actor); more threads
            # only add synchronisation, and Ray leaves a node's OMP_NUM_THREADS as the user set it.
            torch.set_num_threads(torch_threads)
        self._processor = spec.processor()
        self._max_image_pixels = max_image_pixels
        self._tracker = tracker

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, resized = [], []
        for row in batch.to_pylist():
            out, pixels = self._process_row(row)
            rows.append(out)
            resized.append(pixels)
        report_progress(self._tracker, "preprocess", len(rows))
        table = pa.Table.from_pylist(rows, schema=PREPROCESSED_SCHEMA)
        pixels_index = PREPROCESSED_SCHEMA.get_field_index("pixels")
        return table.set_column(pixels_index, PREPROCESSED_SCHEMA.field(pixels_index), _pixels_column(resized))

    def _process_row(self, row: dict) -> tuple[dict, torch.Tensor | None]:
        """A PREPROCESSED row without its pixels, and the resized pixels (None for an error row)."""
        out = {"image_uri": row["image_uri"], "image_id": row["image_id"], "height": None, "width": None,
               "pixels": None, "pixel_shape": None}
        previous_error = StageError.from_row(row)
        if previous_error is not None:
            return {**out, **previous_error.as_columns()}, None
        try:
            image = decode_image(row["data"], max_pixels=self._max_image_pixels)
        except Exception as error:  # noqa: BLE001 - every failure becomes that image's error row
            return {**out, **StageError.from_exception("decode", error).as_columns()}, None
        out["width"], out["height"] = image.size
        try:
            pixels = resize_image(self._processor, image)
            if pixels.dtype != torch.uint8:
                raise ValueError(f"the processor's resize gave {pixels.dtype} pixels; uint8 expected")
        except Exception as error:  # noqa: BLE001
            return {**out, **StageError.from_exception("preprocess", error).as_columns()}, None
        return {**out, "pixel_shape": list(pixels.shape), **NO_ERROR_COLUMNS}, pixels


def _pixels_column(resized: list[torch.Tensor | None]) -> pa.ChunkedArray:
    """Each image's (3, H', W') uint8 pixels in C order (null for error rows), one chunk per image over the resized
    tensor's own memory: no copy here, Ray's copy into its object store is the only one."""
    return pa.chunked_array([pa.nulls(1, pa.large_binary()) if pixels is None else _binary_over(pixels.contiguous())
                             for pixels in resized], type=pa.large_binary())


def _binary_over(pixels: torch.Tensor) -> pa.LargeBinaryArray:
    offsets = pa.py_buffer(np.array([0, pixels.numel()], dtype=np.int64))
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(pixels.numpy())])
