"""Model actors: preprocessed pixel values -> class and mask logits, one model per actor, loaded once.

A batch is split by pixel shape and each group runs as one forward pass with no padding, so an image's
logits never depend on its batch mates (the model ignores `pixel_mask`; padding would change a small
image's result). With the checkpoint's fixed processor size every image has the same shape and batches
stay whole. Only low-resolution logits leave this stage; masks at the original size are made downstream.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa

from pipeline.checkpoint import load_model, localize_checkpoint
from pipeline.progress import report_progress
from pipeline.records import NO_ERROR_COLUMNS, PREDICTED_SCHEMA, StageError, pack_array, unpack_array
from pipeline.storage import StorageConfig

__all__ = ["InferenceStage", "group_by_shape", "run_model"]


def group_by_shape(shapes: list) -> dict[tuple, list[int]]:
    """Row indices grouped by pixel shape, groups in order of first appearance; None shapes are left out."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, shape in enumerate(shapes):
        if shape is not None:
            groups[tuple(shape)].append(index)
    return dict(groups)


def run_model(model, pixel_values: np.ndarray, *, device: str, dtype) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass over same-shape images (batch, 3, H, W) -> float32 class and mask logits."""
    import torch

    with torch.inference_mode():
        inputs = torch.from_numpy(pixel_values).to(device=device, dtype=dtype)
        outputs = model(pixel_values=inputs)
        class_logits = outputs.class_queries_logits.float().cpu().numpy()  # (batch, queries, labels + 1)
        mask_logits = outputs.masks_queries_logits.float().cpu().numpy()  # (batch, queries, H/4, W/4)
    return class_logits, mask_logits


class InferenceStage:
    """Ray Data actor: PREPROCESSED rows -> PREDICTED rows. GPU when the actor was given one, else CPU."""

    def __init__(self, *, model_uri: str, storage: StorageConfig, dtype: str = "float32",
                 torch_threads: int | None = None, tracker=None) -> None:
        import torch

        if torch_threads:
            # Ray pins OMP_NUM_THREADS to the actor's (fractional) CPU request; a CPU model actor is meant to
            # use the cores the pool plan gave it.
            torch.set_num_threads(torch_threads)
        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        self._dtype = getattr(torch, dtype)
        self._model = load_model(localize_checkpoint(model_uri, storage), device=self._device, dtype=dtype)
        self._tracker = tracker
        if tracker is not None:
            tracker.touch.remote()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        results: list[dict | None] = [None] * len(rows)
        for index, row in enumerate(rows):
            error = StageError.from_row(row)
            if error is not None:
                results[index] = _predicted_row(row, error=error)
        shapes = [row["pixel_shape"] if results[i] is None else None for i, row in enumerate(rows)]
        for indices in group_by_shape(shapes).values():
            try:
                pixel_values = np.stack([unpack_array(rows[i]["pixel_values"], rows[i]["pixel_shape"])
                                         for i in indices])  # (group, 3, H', W')
                class_logits, mask_logits = run_model(self._model, pixel_values, device=self._device,
                                                      dtype=self._dtype)
            except Exception as error:  # noqa: BLE001 - the group's images become error rows, the job goes on
                stage_error = StageError.from_exception("inference", error)
                for i in indices:
                    results[i] = _predicted_row(rows[i], error=stage_error)
                continue
            for position, i in enumerate(indices):
                results[i] = _predicted_row(rows[i], class_logits=class_logits[position],
                                            mask_logits=mask_logits[position])
        report_progress(self._tracker, "inference", len(rows))
        return pa.Table.from_pylist(results, schema=PREDICTED_SCHEMA)


def _predicted_row(row: dict, *, error: StageError | None = None, class_logits: np.ndarray | None = None,
                   mask_logits: np.ndarray | None = None) -> dict:
    out = {"image_uri": row["image_uri"], "image_id": row["image_id"], "height": row.get("height"),
           "width": row.get("width"), "class_logits": None, "class_shape": None, "mask_logits": None,
           "mask_shape": None}
    if error is not None:
        return {**out, **error.as_columns()}
    out["class_logits"], out["class_shape"] = pack_array(class_logits)
    out["mask_logits"], out["mask_shape"] = pack_array(mask_logits)
    return {**out, **NO_ERROR_COLUMNS}
