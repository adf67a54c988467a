"""Model actors: uint8 pixels -> normalise, forward and post-process on the model's device -> small segment rows.

A batch is split by pixel shape and each group runs as one forward pass with no padding, so an image's
result never depends on its batch mates (the model ignores `pixel_mask`; padding would change a small
image's result). With the checkpoint's fixed processor size every image has the same shape and batches
stay whole. On a GPU the pixels go through a pinned host buffer with a non-blocking copy, bf16 is the
default dtype, and nothing dense leaves the device: post-processing of every task happens there and only
run lengths come back (see `pipeline.device_postprocess`).

The actor takes `CONCURRENT_CALLS` batches at once (a threaded actor): while one batch holds the device for
its forward pass, the next one's pixels are copied to the device and normalised (on a side CUDA stream on
GPUs), so the device never waits for its input, and the previous batch is post-processed: on a GPU on a
stream of its own, so the next forward is queued before post-processing's host syncs; on CPU on one core
(`CPU_POSTPROCESS_THREADS`) beside the next forward pass on all of them (measured at 800x1088 on 2 cores:
0.150 images/s end to end against 0.132 when they took turns).
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from pipeline.device_postprocess import ImageSegments, PostprocessSettings, segment_batch
from pipeline.model_spec import ModelSpec
from pipeline.progress import report_progress
from pipeline.rle import pack_run_lengths
from pipeline.records import NO_ERROR_COLUMNS, SEGMENTED_SCHEMA, StageError, binary_column_views
from pipeline.storage import StorageConfig

__all__ = ["InferenceStage", "group_by_shape", "default_dtype", "default_batch_size", "torch_threads",
           "COMPILE_PROGRESS_KEY", "CONCURRENT_CALLS", "CPU_POSTPROCESS_THREADS"]

# Batches one model actor takes at once: one on the device, the next one's input being prepared.
CONCURRENT_CALLS = 2

# Post-processing is hundreds of small ops per image: with several threads each op waits for the slowest one, a
# scheduler slice whenever a decode or write actor holds a core (measured 4.4 s instead of 0.66 s per image with
# two threads on two shared cores), so on CPU it runs single-threaded, beside the next forward pass.
CPU_POSTPROCESS_THREADS = 1

# Progress key under which a compiling model actor reports its compile time (milliseconds) to the tracker.
COMPILE_PROGRESS_KEY = "model_compile_ms"


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count of the calling thread set to `count` for the block, then restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_dtype(device: str) -> str:
    """bf16 on GPUs (tensor cores, half the memory traffic); float32 on CPU, where bf16 is slower and less exact."""
    return "bfloat16" if device.startswith("cuda") else "float32"


def default_batch_size(with_gpu: bool) -> int:
    """16 keeps an H200 busy with Swin-T at 800x1088 (gpu-facts.md: b8 97.7, b16 99.5 images/s); a CPU gains
    nothing from large batches and holds their activations in memory."""
    return 16 if with_gpu else 4


def group_by_shape(shapes: list) -> dict[tuple, list[int]]:
    """Row indices grouped by pixel shape, groups in order of first appearance; None shapes are left out."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, shape in enumerate(shapes):
        if shape is not None:
            groups[tuple(shape)].append(index)
    return dict(groups)


class InferenceStage:
    """Ray Data actor: PREPROCESSED rows -> SEGMENTED rows. GPU when the actor was given one, else CPU."""

    def __init__(self, *, spec: ModelSpec, storage: StorageConfig, settings: PostprocessSettings,
                 dtype: str | None = None, compile: bool = False, torch_threads: int | None = None,
                 device: str | None = None, tracker=None) -> None:
        import torch

        # Ray pins OMP_NUM_THREADS to the actor's (fractional) CPU request; a CPU model actor is meant to use the
        # cores the pool plan gave it. torch's thread count is per thread (a new thread copies the process-wide
        # value on its first parallel op), and calls run on the actor's own threads: each call sets it again.
        self._torch_threads = torch_threads
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self._device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._dtype = getattr(torch, dtype or default_dtype(self._device))
        self._processor = spec.processor()
        self._settings = settings
        model = spec.load_model(storage, device=self._device, dtype=str(self._dtype).removeprefix("torch."))
        self._model = torch.compile(model) if compile else model
        self._compile_pending = compile
        self._on_gpu = self._device.startswith("cuda")
        self._pinned = self._on_gpu
        # One forward pass at a time; input preparation and the previous batch's post-processing run beside it.
        self._device_lock = threading.Lock()
        self._streams = threading.local()
        self._tracker = tracker
        if tracker is not None:
            tracker.touch.remote()

    def __call__(self, batch: pa.Table) -> pa.Table:
        meta = batch.drop_columns(["pixels"]).to_pylist()
        pixels = binary_column_views(batch.column("pixels"))
        results: list[dict | None] = [None] * len(meta)
        for index, row in enumerate(meta):
            error = StageError.from_row(row)
            if error is not None:
                results[index] = _segmented_row(row, error=error)
        shapes = [row["pixel_shape"] if results[i] is None else None for i, row in enumerate(meta)]
        for shape, indices in group_by_shape(shapes).items():
            for i, outcome in zip(indices, self._run_group([pixels[i] for i in indices], shape,
                                                           [(meta[i]["height"], meta[i]["width"]) for i in indices])):
                results[i] = _segmented_row(meta[i], **outcome)
        report_progress(self._tracker, "inference", len(meta))
        return pa.Table.from_pylist(results, schema=SEGMENTED_SCHEMA)

    def _run_group(self, pixels: list[np.ndarray], shape: tuple, sizes: list[tuple[int, int]]) -> list[dict]:
        """Same-shape images -> one forward pass and the post-processing of every task, on the device."""
        import torch

        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)
        try:
            with torch.inference_mode():
                inputs = self._prefetched_pixels(pixels, shape)
                with self._device_lock:
                    started = time.monotonic()
                    outputs = self._model(pixel_values=inputs)
                    class_logits = outputs.class_queries_logits.float()  # (group, queries, labels + 1)
                    mask_logits = outputs.masks_queries_logits.float()  # (group, queries, H'/4, W'/4)
                    if self._compile_pending:
                        self._report_compile_time(time.monotonic() - started)
                if not self._on_gpu:  # beside the next forward pass, on one core of the CPU's
                    with torch_threads(CPU_POSTPROCESS_THREADS):
                        return self._postprocessed(class_logits, mask_logits, sizes)
                return self._postprocessed_beside_next_forward(class_logits, mask_logits, sizes)
        except Exception as error:  # noqa: BLE001 - the group's images become error rows, the job goes on
            return [{"error": StageError.from_exception("inference", error)}] * len(pixels)

    def _postprocessed(self, class_logits, mask_logits, sizes: list[tuple[int, int]]) -> list[dict]:
        try:
            segments = segment_batch(class_logits, mask_logits, sizes, self._settings)
        except Exception as error:  # noqa: BLE001 - the group's images become error rows
            return [{"error": StageError.from_exception("postprocess", error)}] * len(sizes)
        return [{"segments": image} for image in segments]

    def _postprocessed_beside_next_forward(self, class_logits, mask_logits, sizes: list[tuple[int, int]]) -> list[dict]:
        """GPU: post-processing on this thread's own stream, outside the device lock, so the other call's forward
        pass is already queued on the default stream while this one's small kernels and host syncs run (its
        syncs then wait for its own stream only, not for the next forward)."""
        import torch

        forward_done = torch.cuda.current_stream(self._device).record_event()
        stream = self._thread_stream("postprocess")
        stream.wait_event(forward_done)
        for logits in (class_logits, mask_logits):  # made on the default stream, read on this one
            logits.record_stream(stream)
        with torch.cuda.stream(stream):
            return self._postprocessed(class_logits, mask_logits, sizes)

    def _thread_stream(self, purpose: str):
        """One CUDA stream per actor thread and purpose, made once (streams are pooled, not free to create)."""
        import torch

        streams = self._streams.__dict__.setdefault("by_purpose", {})
        if purpose not in streams:
            streams[purpose] = torch.cuda.Stream(device=self._device)
        return streams[purpose]

    def _prefetched_pixels(self, pixels: list[np.ndarray], shape: tuple):
        """`_device_pixels` on a side stream (GPU), finished before it returns: overlaps another batch's forward."""
        import torch

        if not self._on_gpu:
            return self._device_pixels(pixels, shape)
        stream = self._thread_stream("input")
        with torch.cuda.stream(stream):
            inputs = self._device_pixels(pixels, shape)
        stream.synchronize()
        inputs.record_stream(torch.cuda.current_stream(self._device))  # used on the default stream from here
        return inputs

    def _device_pixels(self, pixels: list[np.ndarray], shape: tuple):
        """The group's pixels on the device, rescaled and normalised there, in the model's dtype."""
        return self._normalised_on_device(self._host_batch(pixels, shape))

    def _host_batch(self, pixels: list[np.ndarray], shape: tuple):
        """uint8 (group, 3, H', W') in one host buffer (pinned for a GPU): the host's part of the input."""
        import torch

        host = torch.empty((len(pixels), *shape), dtype=torch.uint8, pin_memory=self._pinned)
        host_array = host.numpy()
        for position, flat in enumerate(pixels):
            host_array[position] = flat.reshape(shape)
        return host

    def _normalised_on_device(self, host):
        """The device's part: the uint8 batch copied over, then rescaled and normalised by the processor there."""
        on_device = host.to(self._device, non_blocking=True)
        normalised = self._processor.preprocess(on_device, do_resize=False, input_data_format="channels_first",
                                                return_tensors="pt")["pixel_values"]  # float32, on the device
        return normalised.to(self._dtype)

    def _report_compile_time(self, seconds: float) -> None:
        self._compile_pending = False
        report_progress(self._tracker, COMPILE_PROGRESS_KEY, int(seconds * 1000))


def _segmented_row(row: dict, *, error: StageError | None = None, segments: ImageSegments | None = None) -> dict:
    out = {"image_uri": row["image_uri"], "image_id": row["image_id"], "height": row.get("height"),
           "width": row.get("width"), "segment_task": None, "segment_id": None, "segment_label_id": None,
           "segment_score": None, "segment_was_fused": None, "segment_runs": None, "segment_area": None,
           "segment_bbox": None, "run_lengths": None}
    if error is not None:
        return {**out, **error.as_columns()}
    return {**out, "segment_task": segments.task, "segment_id": segments.segment_id,
            "segment_label_id": segments.label_id, "segment_score": segments.score,
            "segment_was_fused": segments.was_fused, "segment_runs": segments.runs,
            "segment_area": segments.area.tolist(), "segment_bbox": segments.bbox.ravel().tolist(),
            "run_lengths": pack_run_lengths(segments.counts), **NO_ERROR_COLUMNS}
