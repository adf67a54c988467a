"""Labeling pipeline throughput against the bare model loop, on the same images and model, in one run.

    python benchmarks/pipeline_throughput.py                       # 96 generated images, the default model
    python benchmarks/pipeline_throughput.py --model DIR --images 200 --batch-size 8

1. Bare model loop (in this process): every image decoded and preprocessed up front, untimed; then the
   timed part is forward passes only, over same-shape groups in batches of --batch-size, with torch
   using the same thread count the pipeline gives its model actor. One warm-up batch is not timed.
   It runs before and after the pipeline; the faster run is the reference (a shared machine's noise
   then lowers the ratio, never raises it).
2. The pipeline (`pipeline.run_segmentation`, embedded Ray started before the clock starts): listing,
   read, decode+preprocess, model, post-processing to RLE, Parquet writes and the report, end to end.
   Actor start-up (each worker imports torch and loads the model) is inside this time, as a user sees it.
   A short run on a quarter of the images goes first; the difference of the two runs gives the marginal
   rate, the pipeline's speed once its fixed start-up costs are paid.

3. Stage costs (in this process, outside Ray, on --cost-images images): host CPU-seconds per image of each
   stage (decode+resize; the model stage's host work, i.e. filling its input buffer, slicing the run lengths
   the device computed into segments and the segment rows, not the copy to the device, normalising there, the
   forward pass or the device-side post-processing; RLE strings + Parquet writes, all measured images in one
   write call as the job's writers get many) and the bytes per image each stage hands to the next through the
   object store. Each stage runs with the torch threads the job gives it (one for decode and writes).

Prints images/s of both and their ratio (issue 7's CPU bar: marginal pipeline rate >= 0.8 x model-only), the
stage costs against the bars (host CPU <= 15 ms per 480x640 image; <= 3 MB per image through the object store
at 800x1088: `--processor coco`), the CPU-seconds each Ray process kind used during the full run and the peak
resident memory (VmHWM) of every Ray process kind.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from infra.processes import command_line, cpu_seconds, peak_rss_mib, process_tree  # noqa: E402
from pipeline.pools import MODEL_ACTOR_ENV_VARS  # noqa: E402

# The bare loop and the stage costs run in this process with the environment the job gives its model actors
# (read by torch once, at its first allocation: before torch is imported).
os.environ.update(MODEL_ACTOR_ENV_VARS)

DEFAULT_MODEL = REPO_ROOT / "models" / "m2f-shapes-tiny"
# Process titles Ray gives its workers ("ray::MapWorker(MapBatches(InferenceStage))") -> the kind we report.
PROCESS_KINDS = {"PreprocessStage": "preprocess actor", "InferenceStage": "model actor",
                 "PostprocessStage": "postprocess actor", "read_objects": "read task worker",
                 "ProgressTracker": "progress tracker actor"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None,
                        help=f"checkpoint directory (default: {DEFAULT_MODEL.relative_to(REPO_ROOT)} when present, "
                             "else a random-weight model of --random-model's shape)")
    parser.add_argument("--random-model", choices=["small", "tiny", "coco", "swin-t"], default="small",
                        help="shape of the random model used when there is no checkpoint; 'coco': the small Swin "
                             "with a COCO panoptic head (100 queries, 133 labels); 'swin-t': Swin-T Mask2Former "
                             "with that head (the GPU measurements of gpu-facts.md)")
    parser.add_argument("--processor", choices=["model", "coco"], default="model",
                        help="'coco': transformers' default processor (shortest edge 800: 480x640 -> 800x1088)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (bare loop and job)")
    parser.add_argument("--cost-images", type=int, default=8, help="images for the per-stage cost measure")
    parser.add_argument("--skip-pipeline", action="store_true", help="stage costs and bare loop only")
    parser.add_argument("--images", type=int, default=96, help="number of generated images")
    parser.add_argument("--image-size", default="480x640", help="HEIGHTxWIDTH of the generated images")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on a GPU, 4 on CPU")
    parser.add_argument("--tasks", default="panoptic,instance,semantic")
    parser.add_argument("--work-dir", type=Path, default=None, help="where images and tables go (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Inputs


def synthetic_image(index: int, height: int, width: int):
    """Flat shapes on a noisy background (PIL RGB), the same for the same arguments every run."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(index)
    image = Image.fromarray(rng.integers(60, 120, size=(height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        size = int(rng.integers(20, min(height, width) // 2))
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + size, y + size], fill=color)
    return image


def write_images(directory: Path, count: int, height: int, width: int) -> list[Path]:
    """Synthetic JPEGs (`synthetic_image`)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = directory / f"image_{index:05d}.jpg"
        synthetic_image(index, height, width).save(path, quality=90)
        paths.append(path)
    return paths


def random_checkpoint(directory: Path, shape: str, processor: str = "model") -> Path:
    """A random-weight checkpoint: 'small' is a Swin with a realistic cost per image, 'tiny' the test model,
    'coco' the small Swin with a COCO panoptic head (100 queries, 133 labels, `_trained_like_heads`), 'swin-t'
    Swin-T with that head and Mask2Former's default decoder sizes."""
    import torch

    from m2f_model import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    labels = {0: "circle", 1: "square", 2: "triangle", 3: "sky", 4: "ground"}
    if shape in ("coco", "swin-t"):
        labels = {index: f"class-{index}" for index in range(133)}
    if shape == "tiny":
        backbone = {"model_type": "swin", "image_size": 64, "patch_size": 4, "embed_dim": 16, "depths": [1, 1, 2, 1],
                    "num_heads": [1, 2, 2, 4], "window_size": 4, "out_features": ["stage1", "stage2", "stage3", "stage4"]}
        dims, image_side = {"feature_size": 32, "mask_feature_size": 32, "hidden_dim": 32,
                            "encoder_feedforward_dim": 64, "dim_feedforward": 64, "encoder_layers": 2,
                            "decoder_layers": 3, "num_attention_heads": 2, "num_queries": 8}, 64
    elif shape == "swin-t":
        backbone = {"model_type": "swin", "image_size": 224, "patch_size": 4, "embed_dim": 96,
                    "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7,
                    "out_features": ["stage1", "stage2", "stage3", "stage4"]}
        dims, image_side = {"num_queries": 100}, 384
    else:
        backbone = {"model_type": "swin", "image_size": 384, "patch_size": 4, "embed_dim": 48, "depths": [2, 2, 4, 2],
                    "num_heads": [2, 4, 8, 16], "window_size": 12,
                    "out_features": ["stage1", "stage2", "stage3", "stage4"]}
        dims, image_side = {"feature_size": 128, "mask_feature_size": 128, "hidden_dim": 128,
                            "encoder_feedforward_dim": 512, "dim_feedforward": 512, "encoder_layers": 3,
                            "decoder_layers": 4, "num_attention_heads": 4,
                            "num_queries": 100 if shape == "coco" else 50}, 384
    torch.manual_seed(0)
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=len(labels), id2label=labels,
                               label2id={v: k for k, v in labels.items()}, **dims)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    size = {"height": image_side, "width": image_side} if processor == "model" else None
    image_processor = Mask2FormerImageProcessor(size=size, num_labels=len(labels), ignore_index=255)
    if shape in ("coco", "swin-t"):
        _trained_like_heads(model, image_processor)
    model.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    return directory


SMOOTH_DIRECTIONS = 8


def _smooth_feature_projection(features, directions: int):
    """(C, C) projection onto the `directions` feature directions whose image varies least from pixel to pixel
    relative to its variance (smallest generalised eigenvectors of gradient vs feature covariance): masks
    read along them are regions, not speckle."""
    import torch

    channels = features.shape[0]
    centred = features.flatten(1) - features.flatten(1).mean(dim=1, keepdim=True)
    covariance = centred @ centred.T / centred.shape[1] + 1e-6 * torch.eye(channels, dtype=features.dtype)
    dx = (features[:, :, 1:] - features[:, :, :-1]).flatten(1)
    dy = (features[:, 1:, :] - features[:, :-1, :]).flatten(1)
    gradient = (dx @ dx.T + dy @ dy.T) / centred.shape[1]
    cholesky = torch.linalg.cholesky(covariance)
    inverse = torch.linalg.inv(cholesky)
    _, vectors = torch.linalg.eigh(inverse @ gradient @ inverse.T)  # ascending eigenvalues
    basis = inverse.T @ vectors[:, :directions]  # (C, k), the smoothest directions
    return basis @ torch.linalg.pinv(basis)


def _trained_like_heads(model, image_processor) -> None:
    """Random heads made to give what a trained COCO model gives post-processing: confident classes and
    region-like masks (tens of segments per image of ~1000 run lengths each, rather than one segment, so RLE,
    writes and the instance and panoptic paths do their real work). Calibrated on one synthetic image, whatever
    the model's sizes.

    Class logits scaled to a spread of 14 over the classes: a query's top class passes the 0.5 threshold.
    Masks: a random model's pixel embeddings are speckled and share one large mean direction, so its masks are
    all alike and noisy; the mask embedding is projected onto the smoothest feature directions
    (`_smooth_feature_projection`), scaled to a logit spread of 4 and shifted along the mean direction until
    ~10% of the logits are positive. (Masked attention reads the masks, so each scale is measured again.)
    """
    import torch

    pixels = image_processor(synthetic_image(0, 480, 640), return_tensors="pt")["pixel_values"]
    last = model.model.transformer_module.decoder.mask_predictor.mask_embedder[-1][0]  # its final Linear
    with torch.no_grad():
        features = model(pixel_values=pixels).pixel_decoder_last_hidden_state[0].double()  # (C, h, w)
        mean = features.mean(dim=(1, 2)).float()  # (C,)
        onto_smooth = _smooth_feature_projection(features, SMOOTH_DIRECTIONS).float()
        last.weight.copy_(onto_smooth @ last.weight)
        last.bias.copy_(onto_smooth @ last.bias)
        for _ in range(4):
            outputs = model(pixel_values=pixels)
            model.class_predictor.weight.mul_(14.0 / outputs.class_queries_logits.std(dim=-1).mean())
            mask_logits = outputs.masks_queries_logits
            mask_scale = 4.0 / mask_logits.std()
            last.weight.mul_(mask_scale)
            last.bias.mul_(mask_scale)
            # shift along the mean direction so that ~10% of the logits are positive
            last.bias.sub_(mask_scale * mask_logits.flatten().quantile(0.9) * mean / mean.dot(mean))


# ----------------------------------------------------------------------------------------------
# 1. The bare model loop


def bare_model_loop(model_dir: Path, image_paths: list[Path], *, batch_size: int, threads: int, device: str,
                    dtype: str, compile: bool = False) -> dict:
    """Forward passes only, inputs already on the device; outputs stay there (the device's own speed)."""
    import torch
    from PIL import Image

    from m2f_model import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    torch.set_num_threads(threads)
    processor = Mask2FormerImageProcessor.from_pretrained(str(model_dir))
    model = Mask2FormerForUniversalSegmentation.from_pretrained(str(model_dir)).eval().to(
        device=device, dtype=getattr(torch, dtype))
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for path in image_paths:  # untimed: decode + preprocess, one image at a time as the pipeline does
        image = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
        pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"][0]  # (3, H', W')
        groups[tuple(pixel_values.shape)].append(pixel_values)
    batches = [torch.stack(group[start:start + batch_size]).to(device=device, dtype=getattr(torch, dtype))
               for group in groups.values() for start in range(0, len(group), batch_size)]
    compile_s = None
    with torch.inference_mode():
        if compile:
            model = torch.compile(model)
            started = time.perf_counter()
            model(pixel_values=batches[0])
            _synchronize(device)
            compile_s = time.perf_counter() - started
        model(pixel_values=batches[0])  # warm-up, untimed
        _synchronize(device)
        started = time.perf_counter()
        for batch in batches:
            model(pixel_values=batch)
        _synchronize(device)
        elapsed = time.perf_counter() - started
    return {"images": len(image_paths), "seconds": elapsed, "images_per_s": len(image_paths) / elapsed,
            "threads": threads, "batches": len(batches), "pixel_shapes": sorted(str(s) for s in groups),
            "device": device, "dtype": dtype, "compile_s": compile_s}


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# 3. Stage costs: host CPU per image and bytes per image between stages


def stage_costs(model_dir: Path, image_paths: list[Path], *, batch_size: int, device: str, dtype: str,
                tasks: str, output_dir: Path, model_threads: int) -> dict:
    """Runs the three stage classes in this process over `image_paths`; CPU-seconds and bytes per image.

    Each stage runs with the torch threads the job gives its actors: one for decode+resize and writing,
    `model_threads` for the model stage (CPU-seconds grow with threads that wait on each other)."""
    import pyarrow as pa
    import torch

    from pipeline.device_postprocess import PostprocessSettings, segments_from_counts, segments_on_device
    from pipeline.inference import CPU_POSTPROCESS_THREADS, InferenceStage, _segmented_row, torch_threads
    from pipeline.model_spec import resolve_model
    from pipeline.postprocess import PostprocessStage
    from pipeline.preprocess import PreprocessStage
    from pipeline.records import FETCHED_SCHEMA, SEGMENTED_SCHEMA, binary_column_views
    from pipeline.storage import StorageConfig

    storage = StorageConfig.resolve({}, environ={})
    spec = resolve_model(str(model_dir), storage)
    settings = PostprocessSettings(tasks=tuple(tasks.split(",")))
    preprocess = PreprocessStage(spec=spec)  # timed on one thread below, as the job runs it
    inference = InferenceStage(spec=spec, storage=storage, settings=settings, dtype=dtype, device=device)
    torch.set_num_threads(model_threads)
    write = PostprocessStage(spec=spec, storage=storage, output_uri=str(output_dir), tasks=settings.tasks,
                             run_id="bench")
    fetched = [pa.Table.from_pylist([{"image_uri": str(p), "image_id": p.name, "data": p.read_bytes()}
                                     for p in image_paths[start:start + batch_size]], schema=FETCHED_SCHEMA)
               for start in range(0, len(image_paths), batch_size)]
    with torch_threads(1):
        warm_up = preprocess(fetched[0])
    inference(warm_up)  # warm-up: first-call allocations and kernel choices, untimed
    # The model stage's call is timed whole, and again in parts: forward and device post-processing are the
    # device's work; pixels to the device (pinned copy, normalise) and the segment rows are its host work.
    cpu: dict[str, float] = defaultdict(float)
    wall: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def timed(name: str, threads: int | None = None):
        with torch_threads(threads or torch.get_num_threads()):
            cpu_started, wall_started = time.process_time(), time.perf_counter()
            yield
            _synchronize(device)
            cpu[name] += time.process_time() - cpu_started
            wall[name] += time.perf_counter() - wall_started

    sizes = {"fetched": 0, "preprocessed": 0, "segmented": 0, "images_rows": 0}
    all_segmented = []
    segments = 0
    postprocess_threads = CPU_POSTPROCESS_THREADS if device == "cpu" else None
    for batch in fetched:
        with timed("decode_resize", threads=1):
            preprocessed = preprocess(batch)
        with timed("model_stage_call"):
            segmented = inference(preprocessed)
        # The model stage's work again in its parts, on the same inputs.
        shape = tuple(preprocessed["pixel_shape"][0].as_py())
        sizes_hw = list(zip(preprocessed["height"].to_pylist(), preprocessed["width"].to_pylist()))
        with torch.inference_mode():
            with timed("pixels_to_host_buffer"):
                # the pixels as the stage sees them (views into the column), not copied out into Python bytes
                host = inference._host_batch(binary_column_views(preprocessed.column("pixels")), shape)
            with timed("copy_and_normalise_on_device"):
                inputs = inference._normalised_on_device(host)
            with timed("forward"):
                outputs = inference._model(pixel_values=inputs)
            with timed("device_postprocess", threads=postprocess_threads):
                results, counts = segments_on_device(outputs.class_queries_logits.float(),
                                                     outputs.masks_queries_logits.float(), sizes_hw, settings)
        with timed("segments_from_counts"):
            image_segments = segments_from_counts(results, counts, sizes_hw)
        with timed("segment_rows"):
            rows = [_segmented_row(row, segments=image) for row, image in
                    zip(preprocessed.drop_columns(["pixels"]).to_pylist(), image_segments)]
            pa.Table.from_pylist(rows, schema=SEGMENTED_SCHEMA)
        all_segmented.append(segmented)
        segments += sum(len(t) for t in segmented["segment_task"].to_pylist())
        for name, table in (("fetched", batch), ("preprocessed", preprocessed), ("segmented", segmented)):
            sizes[name] += table.nbytes
    # The job's writers get up to --images-per-file (2048) images per call; here all the measured ones at once.
    with timed("write", threads=1):
        images = write(pa.concat_tables(all_segmented))
    sizes["images_rows"] += images.nbytes
    count = len(image_paths)
    model_host_parts = ("pixels_to_host_buffer", "segments_from_counts", "segment_rows")
    per_image_ms = {name: round(1000 * value / count, 2) for name, value in cpu.items()}
    per_image_ms["model_stage_host"] = round(1000 * sum(cpu[name] for name in model_host_parts) / count, 2)
    # Host work: decode+resize, the model stage's host part (filling the input buffer, run lengths, segment rows),
    # writing. Copying to the device and normalising there is the device's work, like the forward (on a CPU
    # "device" the same cores do it, so it is also reported beside).
    host_ms = per_image_ms["decode_resize"] + per_image_ms["model_stage_host"] + per_image_ms["write"]
    object_store = sizes["preprocessed"] + sizes["segmented"] + sizes["images_rows"]
    model_stage_wall = sum(wall[name] for name in ("forward", "device_postprocess", "copy_and_normalise_on_device",
                                                   *model_host_parts))
    return {"images": count, "device": device, "dtype": dtype, "segments_per_image": round(segments / count, 1),
            # The marginal rate ratio the model stage allows when it is the bottleneck: its forward passes' time
            # over the time of all its parts, in turn as the model actor runs them (wall clock: the forward uses
            # every core, post-processing one on CPU).
            "forward_share_of_model_stage": round(wall["forward"] / model_stage_wall, 4),
            "model_stage_wall_ms_per_image": {name: round(1000 * wall[name] / count, 2) for name in
                                              ("forward", "device_postprocess", "copy_and_normalise_on_device",
                                               *model_host_parts)},
            "cpu_ms_per_image": per_image_ms, "host_cpu_ms_per_image": round(host_ms, 2),
            "host_cpu_ms_per_image_with_device_normalise": round(
                host_ms + per_image_ms["copy_and_normalise_on_device"], 2),
            "bytes_per_image": {name: int(value / count) for name, value in sizes.items()},
            "object_store_bytes_per_image": int(object_store / count),
            "pixel_shape": list(shape), "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------
# 2. The pipeline, with a memory sampler over this Ray cluster's processes


def _process_kind(pid: int) -> str | None:
    title = command_line(pid)
    if title is None or not title.startswith("ray::"):
        return None
    return next((kind for marker, kind in PROCESS_KINDS.items() if marker in title), None)


class PeakMemorySampler(threading.Thread):
    """Polls every Ray process under this process: the peak RSS per worker kind, and the CPU-seconds each
    process has used (`cpu_by_kind` gives them per kind between two `cpu_snapshot`s)."""

    def __init__(self, interval_s: float = 2.0) -> None:  # a sample walks /proc: ~3 ms of the driver's CPU
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peaks_mib: dict[str, float] = {}
        self.processes: dict[str, set[int]] = defaultdict(set)
        self._cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU-seconds at the last sample)
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval_s)

    def sample(self) -> None:
        for pid in process_tree(os.getpid()):
            kind = _process_kind(pid)
            peak = peak_rss_mib(pid) if kind else None
            if kind and peak is not None:
                self.processes[kind].add(pid)
                self.peaks_mib[kind] = max(self.peaks_mib.get(kind, 0.0), peak)
            used = cpu_seconds(pid)
            if used:
                with self._lock:
                    self._cpu[pid] = (kind or ("driver" if pid == os.getpid() else "ray's own processes"), used)

    def cpu_snapshot(self) -> dict[int, tuple[str, float]]:
        self.sample()
        with self._lock:
            return dict(self._cpu)

    @staticmethod
    def cpu_by_kind(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
        """CPU-seconds per process kind between two snapshots (processes started in between count in full;
        a process that ended between two samples loses its last half second)."""
        used: dict[str, float] = defaultdict(float)
        for pid, (kind, seconds) in after.items():
            used[kind] += seconds - before.get(pid, (kind, 0.0))[1]
        return {kind: round(value, 2) for kind, value in sorted(used.items())}

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


def pipeline_runs(model_dir: Path, input_dir: Path, output_dir: Path, *, images: int, batch_size: int,
                  tasks: str, dtype: str | None, compile: bool) -> dict:
    """Two runs on one embedded Ray: a short one (a quarter of the images), then all images.

    The full run's time gives the end-to-end images/s; the difference between the runs gives the marginal
    images/s, i.e. the pipeline's rate once its fixed costs (actor start-up, model loads, report) are paid.
    """
    import ray

    from pipeline import SegmentationOptions, run_segmentation
    from pipeline.local_ray import start_local_ray

    ray_started = time.perf_counter()
    start_local_ray(logging_level="WARNING")  # the job's embedded Ray (workers import this checkout)
    ray_start_s = time.perf_counter() - ray_started
    sampler = PeakMemorySampler()
    sampler.start()
    runs = {}
    try:
        for name, limit in (("short", max(2 * batch_size, images // 4)), ("full", None)):
            cpu_before = sampler.cpu_snapshot()
            started = time.perf_counter()
            report = run_segmentation(SegmentationOptions(
                input=str(input_dir), output=str(output_dir / name), model=str(model_dir), tasks=tasks,
                batch_size=batch_size, limit=limit, show_progress=False, dtype=dtype, compile=compile))
            runs[name] = {"images": report["processed"], "ok": report["ok"], "seconds": time.perf_counter() - started,
                          "segments": report["segments"], "pools": report["pools"],
                          "compile_s": report.get("compile_s"),
                          # the job's own estimate: images after its first committed batch / time after it
                          "report_steady_images_per_s": report.get("steady_images_per_s"),
                          "cpu_seconds_by_process_kind": sampler.cpu_by_kind(cpu_before, sampler.cpu_snapshot())}
    finally:
        sampler.stop()
        ray.shutdown()
    full, short = runs["full"], runs["short"]
    extra_images, extra_seconds = full["images"] - short["images"], full["seconds"] - short["seconds"]
    return {"images": full["images"], "ok": full["ok"], "seconds": full["seconds"],
            "images_per_s": full["images"] / full["seconds"],
            # None when the runs are too alike in size, or too noisy, to say anything
            "marginal_images_per_s": extra_images / extra_seconds if extra_images > 0 and extra_seconds > 0 else None,
            "report_steady_images_per_s": full["report_steady_images_per_s"],
            "short_run": short, "ray_start_s": ray_start_s, "pools": full["pools"], "segments": full["segments"],
            "full_run_cpu_seconds_by_process_kind": full["cpu_seconds_by_process_kind"],
            # what each kind of process spends per image once the fixed costs are paid (start-up, model loads)
            "marginal_cpu_seconds_per_image_by_process_kind": {
                kind: round((seconds - short["cpu_seconds_by_process_kind"].get(kind, 0.0)) / extra_images, 3)
                for kind, seconds in full["cpu_seconds_by_process_kind"].items()} if extra_images > 0 else None,
            "peak_rss_mib": {k: round(v, 1) for k, v in sampler.peaks_mib.items()},
            "process_counts": {k: len(v) for k, v in sampler.processes.items()}}


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import torch

    from pipeline.inference import default_batch_size, default_dtype

    args = parse_args(argv)
    height, width = (int(v) for v in args.image_size.lower().split("x"))
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="m2f-throughput-"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or default_dtype(device)
    batch_size = args.batch_size or default_batch_size(device.startswith("cuda"))
    model_dir = args.model or (DEFAULT_MODEL if (DEFAULT_MODEL / "config.json").exists() and args.random_model ==
                               "small" and args.processor == "model" else None)
    if model_dir is None:
        model_dir = random_checkpoint(work_dir / f"random-{args.random_model}-{args.processor}", args.random_model,
                                      args.processor)
    image_paths = write_images(work_dir / "images", args.images, height, width)
    threads = os.cpu_count() or 1  # what the pool plan gives the single CPU model actor on one node
    load = os.getloadavg()
    print(f"model {model_dir}; {args.images} images {height}x{width}; device {device} {dtype}; batch size "
          f"{batch_size}; torch threads {threads}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}",
          flush=True)
    results = {"model": str(model_dir), "images": args.images, "image_size": [height, width], "device": device,
               "dtype": dtype, "compile": args.compile, "batch_size": batch_size, "load_average_start": load}

    costs = stage_costs(model_dir, image_paths[:args.cost_images], batch_size=batch_size, device=device, dtype=dtype,
                        tasks=args.tasks, output_dir=work_dir / "cost-tables",
                        model_threads=threads if device == "cpu" else 1)
    results["stage_costs"] = costs
    print(f"stage costs ({costs['images']} images, pixels {costs['pixel_shape']}, {costs['segments_per_image']} "
          f"segments/image): CPU ms per image {costs['cpu_ms_per_image']}")
    print(f"host CPU per image, every stage, forward and device post-processing excepted: "
          f"{costs['host_cpu_ms_per_image']:.2f} ms (bar <= 15 ms at 480x640); with the copy to the device and "
          f"normalising there: {costs['host_cpu_ms_per_image_with_device_normalise']:.2f} ms")
    print(f"model stage, wall ms per image by part: {costs['model_stage_wall_ms_per_image']}; forward share "
          f"{costs['forward_share_of_model_stage']:.3f} (the marginal rate ratio it allows when the model stage is the "
          "bottleneck; bar >= 0.8)")
    print(f"object store bytes per image: {costs['object_store_bytes_per_image'] / 1e6:.3f} MB "
          f"(bar <= 3 MB at 800x1088); by stage output: {costs['bytes_per_image']}", flush=True)

    bare_before = bare_model_loop(model_dir, image_paths, batch_size=batch_size, threads=threads, device=device,
                                  dtype=dtype, compile=args.compile)
    print(f"bare model loop: {bare_before['images_per_s']:.3f} images/s ({bare_before['seconds']:.1f} s)", flush=True)
    results["bare_model_loop_first"] = bare_before
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.skip_pipeline:
        print(json.dumps(results))
        return 0
    bare_peak_rss_mib = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    piped = pipeline_runs(model_dir, work_dir / "images", work_dir / "tables", images=args.images,
                          batch_size=batch_size, tasks=args.tasks, dtype=dtype, compile=args.compile)
    # The machine may be shared: the model loop runs again after the pipeline, and the faster of the two
    # runs is the reference (the ratio errs low, never high).
    bare_after = bare_model_loop(model_dir, image_paths, batch_size=batch_size, threads=threads, device=device,
                                 dtype=dtype, compile=args.compile)
    print(f"bare model loop again: {bare_after['images_per_s']:.3f} images/s ({bare_after['seconds']:.1f} s)")
    bare = dict(max(bare_before, bare_after, key=lambda run: run["images_per_s"]),
                runs_images_per_s=[bare_before["images_per_s"], bare_after["images_per_s"]],
                process_peak_rss_mib=bare_peak_rss_mib)
    planned_threads = (piped["pools"] or {}).get("model_torch_threads")
    ratio = piped["images_per_s"] / bare["images_per_s"]
    print(f"model-only reference (faster of the two loops): {bare['images_per_s']:.3f} images/s")
    results.update({"bare_model_loop": bare, "pipeline": piped,
                    "ratio_pipeline_to_model": round(ratio, 4),
                    "marginal_ratio_pipeline_to_model": (round(piped["marginal_images_per_s"] / bare["images_per_s"], 4)
                                                         if piped["marginal_images_per_s"] else None),
                    "target_marginal_ratio": 0.8, "load_average_end": os.getloadavg(),
                    "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})

    print(f"pipeline:        {piped['images_per_s']:.3f} images/s ({piped['seconds']:.1f} s end to end; "
          f"Ray start {piped['ray_start_s']:.1f} s not counted)")
    print(f"ratio pipeline / model-only: {ratio:.3f}")
    if piped["marginal_images_per_s"]:
        print(f"marginal pipeline rate (full run minus a {piped['short_run']['images']}-image run): "
              f"{piped['marginal_images_per_s']:.3f} images/s, ratio {results['marginal_ratio_pipeline_to_model']:.3f}"
              f" (bar >= 0.8)")
    else:
        print("marginal pipeline rate: not measurable (use more --images, or the machine is too noisy)")
    if piped["report_steady_images_per_s"]:
        print(f"the job's report, rate after its first committed batch: {piped['report_steady_images_per_s']:.3f} "
              f"images/s, ratio {piped['report_steady_images_per_s'] / bare['images_per_s']:.3f}")
    if piped["short_run"].get("compile_s") is not None:
        print(f"model actor compile time (first forward): {piped['short_run']['compile_s']:.1f} s")
    if planned_threads is not None and planned_threads != threads:
        print(f"note: the pipeline's model actor used {planned_threads} torch threads, the bare loop {threads}")
    full_cpu = piped["full_run_cpu_seconds_by_process_kind"]
    print(f"CPU seconds by process kind during the {piped['images']}-image run ({piped['seconds']:.0f} s): " + ", ".join(
        f"{kind} {seconds:.1f}" for kind, seconds in full_cpu.items()))
    marginal_cpu = piped["marginal_cpu_seconds_per_image_by_process_kind"]
    if marginal_cpu:
        print("marginal CPU seconds per image by process kind (full run minus short run, per extra image): " +
              ", ".join(f"{kind} {seconds:.3f}" for kind, seconds in marginal_cpu.items()))
    print("peak RSS by process kind (MiB): " + ", ".join(
        f"{kind} {peak:.0f} (x{piped['process_counts'].get(kind, 0)})" for kind, peak in
        sorted(piped["peak_rss_mib"].items())))
    print(f"load average at the end: {results['load_average_end'][0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
