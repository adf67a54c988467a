"""m2f_model against transformers 5.24 on the same weights and inputs, in one run.

Prints, for each measure, the median wall time of both (with the fastest run and the median process
CPU time beside it, since the machine may be shared), the speed ratios transformers / ours, the
peak memory of each call, and whether the outputs agree:
- forward of a Swin-T Mask2Former (transformers' config defaults, SwinConfig embed_dim 96, depths
  [2, 2, 6, 2], heads [3, 6, 12, 24], window 7, num_labels 133; random weights; built in
  transformers, saved with save_pretrained, loaded by m2f_model) at 384x384 and 800x1088, batch 1
  and 4;
- preprocessing of one 640x480 PIL image with the default settings (-> 800x1088), against
  transformers' default (torchvision) processor and its PIL processor;
- the three post-processors at 100 queries and 133 labels (96x96 mask logits, target 480x640)
  on realistic random logits: blob-shaped masks, a quarter of the queries confident about one
  class, the rest confident "no object".

Peak memory: the growth of the process's peak resident set size (VmHWM, reset through
/proc/self/clear_refs before each call) during one call, measured in a child process run first
with glibc's mmap threshold pinned at 128 KiB (MALLOC_MMAP_THRESHOLD_), so that every freed
tensor goes back to the OS and each call's peak is its own. Timing runs in this process with the
default allocator (a pinned threshold makes every large allocation page-fault afresh).

With --device (cuda on the GPU machine, or cpu) the script runs the forward report instead: Swin-T and
Swin-L Mask2Former (COCO heads: 100 / 200 queries, 133 labels) at 800x1088, batches 1/8/16, in --dtype,
both models eager and ours also under torch.compile with --compile; for each: images/s of both and the
ratio, max |diff| of the logits of ours and of transformers in that dtype against ours in float32 and
of ours against transformers, peak device memory above the weights, host synchronisations inside our
forward (CUDA's sync debug mode), and a profile of the top kernels of both. Every result is appended
to <output-dir>/forward.jsonl (and report.txt) as it comes. This path needs only torch, transformers,
scipy and m2f_model (no Ray, no pycocotools):

  python benchmarks/model_vs_transformers.py --device cuda --dtype bfloat16 --compile --output-dir out/bench-gpu
  python benchmarks/model_vs_transformers.py --device cpu --dtype bfloat16 --compile --quick   # check it here

Usage: python benchmarks/model_vs_transformers.py [--quick] [--skip-forward] [--repeats N]
       python benchmarks/model_vs_transformers.py --device cuda [--dtype D] [--compile] [--output-dir DIR] ...
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import json
import subprocess

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infra.processes import status_kib  # noqa: E402

MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
NUM_THREADS = 2
COCO_PANOPTIC_LABELS = 133
COCO_THING_LABELS = 80


# ------------------------------------------------------------------------------------- measuring
def peak_rss_growth_mib(function: Callable[[], Any]) -> float:
    """How far the resident set grew above its level before the call, at its peak during the call."""
    gc.collect()
    before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    result = function()
    peak = status_kib("VmHWM")
    del result
    return max(peak - before, 0) / 1024


@dataclass
class Timing:
    wall_s: float  # median
    cpu_s: float  # median process CPU time (all threads)
    min_wall_s: float  # the least disturbed run, for a shared machine


def measure_pair(reference: Callable[[], Any], ours: Callable[[], Any], repeats: int,
                 warmup: int = 1) -> tuple[Timing, Timing]:
    """Times both, alternating run by run so that load changes on a shared machine hit both alike."""
    for _ in range(warmup):
        reference()
        ours()
    samples: dict[int, tuple[list[float], list[float]]] = {0: ([], []), 1: ([], [])}
    for _ in range(repeats):
        for side, function in enumerate((reference, ours)):
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            function()
            samples[side][1].append(time.process_time() - cpu_start)
            samples[side][0].append(time.perf_counter() - wall_start)
    timings = []
    for side in (0, 1):
        walls, cpus = samples[side]
        timings.append(Timing(statistics.median(walls), statistics.median(cpus), min(walls)))
    return timings[0], timings[1]


class Bench:
    """Runs each comparison either for peak memory (child process) or for time (and prints the report)."""

    def __init__(self, *, memory_child: bool, peaks: dict[str, list[float]] | None = None) -> None:
        self.memory_child = memory_child
        self.peaks = peaks or {}

    def compare(self, name: str, reference: Callable[[], Any], ours: Callable[[], Any], agreement: str, *,
                repeats: int, warmup: int = 1) -> None:
        if self.memory_child:
            for _ in range(warmup):
                reference()
                ours()
            print(json.dumps({"name": name, "peaks": [peak_rss_growth_mib(reference), peak_rss_growth_mib(ours)]}),
                  flush=True)
            return
        reference_timing, our_timing = measure_pair(reference, ours, repeats, warmup)
        reference_peak, our_peak = self.peaks.get(name, [float("nan"), float("nan")])
        print(f"{name:<44} transformers {reference_timing.wall_s * 1e3:8.1f} ms (min "
              f"{reference_timing.min_wall_s * 1e3:8.1f}, cpu {reference_timing.cpu_s * 1e3:8.1f}) peak "
              f"+{reference_peak:6.1f} MiB | ours {our_timing.wall_s * 1e3:8.1f} ms (min "
              f"{our_timing.min_wall_s * 1e3:8.1f}, cpu {our_timing.cpu_s * 1e3:8.1f}) peak +{our_peak:6.1f} MiB "
              f"| ratio {reference_timing.wall_s / our_timing.wall_s:5.2f}x (min "
              f"{reference_timing.min_wall_s / our_timing.min_wall_s:5.2f}x, cpu "
              f"{reference_timing.cpu_s / our_timing.cpu_s:5.2f}x) | {agreement}", flush=True)


def measure_peaks_in_child(arguments: list[str]) -> dict[str, list[float]]:
    """Runs this script with --memory-child under a pinned mmap threshold; returns name -> [theirs, ours]."""
    environment = dict(os.environ, **{MMAP_THRESHOLD_ENV: "131072"})
    completed = subprocess.run([sys.executable, os.path.abspath(__file__), *arguments, "--memory-child"],
                               env=environment, capture_output=True, text=True)
    if completed.returncode != 0:
        print(f"memory child failed ({completed.returncode}); peaks left out:\n{completed.stderr[-2000:]}",
              flush=True)
    peaks = {}
    for line in completed.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            peaks[record["name"]] = record["peaks"]
    return peaks


# ------------------------------------------------------------------------------------- comparing
def max_abs_difference(reference: Any, ours: Any) -> float:
    """Largest absolute difference over matching tensors (inf when structures differ)."""
    if isinstance(reference, torch.Tensor):
        if not isinstance(ours, torch.Tensor) or reference.shape != ours.shape:
            return float("inf")
        if reference.numel() == 0:
            return 0.0
        return (reference.double() - ours.double()).abs().max().item()
    if isinstance(reference, dict) or hasattr(reference, "keys"):
        if set(reference.keys()) != set(ours.keys()):
            return float("inf")
        return max([max_abs_difference(reference[key], ours[key]) for key in reference.keys()], default=0.0)
    if isinstance(reference, (list, tuple)):
        if not isinstance(ours, (list, tuple)) or len(reference) != len(ours):
            return float("inf")
        return max([max_abs_difference(a, b) for a, b in zip(reference, ours)], default=0.0)
    if isinstance(reference, (int, float, bool)) and isinstance(ours, (int, float, bool)):
        return abs(float(reference) - float(ours))
    return 0.0 if reference == ours else float("inf")


# ------------------------------------------------------------------------------------- inputs
def realistic_outputs(*, seed: int, batch: int = 1, queries: int = 100, labels: int = COCO_PANOPTIC_LABELS,
                      height: int = 96, width: int = 96, confident_fraction: float = 0.25) -> SimpleNamespace:
    """Mask2Former-like outputs: confident queries split the image between them, the rest say "no object".

    Each confident query is sure of one class and owns the cell of a (radius-weighted) Voronoi
    partition: its mask logit grows with the margin to the nearest other cell, so masks are blobs
    that barely overlap and every pixel is claimed, as with a trained panoptic model. The first four
    are large "stuff" cells. The other queries have low logits everywhere.
    """
    generator = torch.Generator().manual_seed(seed)
    confident = torch.rand(batch, queries, generator=generator) < confident_fraction
    confident[:, :4] = True
    class_logits = torch.randn(batch, queries, labels + 1, generator=generator)  # (B, Q, L+1)
    chosen = torch.randint(0, labels, (batch, queries), generator=generator)
    class_logits.scatter_add_(2, chosen[..., None], (confident.float() * 9.0)[..., None])
    class_logits[..., -1] += (~confident).float() * 7.0
    ys = torch.linspace(0, 1, height).view(1, 1, height, 1)
    xs = torch.linspace(0, 1, width).view(1, 1, 1, width)
    centres = torch.rand(batch, queries, 2, 1, 1, generator=generator)
    radii = 0.05 + 0.2 * torch.rand(batch, queries, 1, 1, generator=generator)
    radii[:, :4] = 0.6
    scaled_distance = ((ys - centres[:, :, 0]) ** 2 + (xs - centres[:, :, 1]) ** 2).sqrt() / radii  # (B, Q, h, w)
    scaled_distance = torch.where(confident[..., None, None], scaled_distance, torch.inf)
    two_nearest = scaled_distance.topk(2, dim=1, largest=False).values  # (B, 2, h, w)
    nearest_other = torch.where(scaled_distance == two_nearest[:, :1], two_nearest[:, 1:], two_nearest[:, :1])
    margin = torch.where(confident[..., None, None], nearest_other - scaled_distance, -1.0)
    coarse_noise = torch.randn(batch * queries, 1, 6, 6, generator=generator)
    smooth_noise = torch.nn.functional.interpolate(coarse_noise, size=(height, width), mode="bicubic",
                                                   align_corners=False).view(batch, queries, height, width)
    mask_logits = (12.0 * margin).clamp(-10.0, 10.0) + 1.5 * smooth_noise  # (B, Q, h, w)
    return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)


# The COCO panoptic Mask2Former checkpoints' shapes (facebook/mask2former-swin-{tiny,large}-coco-panoptic).
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "swin-t": {"backbone": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7},
               "num_queries": 100},
    "swin-l": {"backbone": {"embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48],
                            "window_size": 12},
               "num_queries": 200},
}


def mask2former_config(transformers_module: Any, name: str = "swin-t") -> Any:
    shape = MODEL_SHAPES[name]
    backbone = transformers_module.SwinConfig(**shape["backbone"],
                                              out_features=["stage1", "stage2", "stage3", "stage4"])
    return transformers_module.Mask2FormerConfig(backbone_config=backbone, num_labels=COCO_PANOPTIC_LABELS,
                                                 num_queries=shape["num_queries"])


# ------------------------------------------------------------------------------------- measures
def bench_forward(bench: Bench, transformers_module: Any, sizes: list[tuple[int, int]], batches: list[int],
                  repeats: int) -> None:
    from m2f_model import Mask2FormerForUniversalSegmentation

    torch.manual_seed(0)
    reference_model = transformers_module.Mask2FormerForUniversalSegmentation(mask2former_config(transformers_module))
    reference_model.eval()
    with tempfile.TemporaryDirectory() as directory:
        reference_model.save_pretrained(directory)
        our_model = Mask2FormerForUniversalSegmentation.from_pretrained(directory).eval()
    for height, width in sizes:
        for batch in batches:
            pixel_values = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
            with torch.inference_mode():
                agreement = "max |diff| logits not compared (memory run)"
                if not bench.memory_child:
                    expected = reference_model(pixel_values=pixel_values)
                    actual = our_model(pixel_values=pixel_values)
                    difference = max(
                        max_abs_difference(expected.class_queries_logits, actual.class_queries_logits),
                        max_abs_difference(expected.masks_queries_logits, actual.masks_queries_logits))
                    agreement = f"max |diff| logits {difference:.2e}"
                    del expected, actual
                # The agreement check above already warmed both models up.
                big = height * width * batch > 2 * 800 * 1088
                bench.compare(f"forward {height}x{width} batch {batch}",
                              lambda: reference_model(pixel_values=pixel_values),
                              lambda: our_model(pixel_values=pixel_values), agreement,
                              repeats=max(1, repeats // 3) if big else repeats, warmup=0)


def bench_preprocessing(bench: Bench, transformers_module: Any, repeats: int) -> None:
    from PIL import Image

    from m2f_model.image_processing import Mask2FormerImageProcessor

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    ours = Mask2FormerImageProcessor()
    our_result = ours(image, return_tensors="pt")
    for name, reference in [("torchvision", transformers_module.Mask2FormerImageProcessor()),
                            ("PIL", transformers_module.Mask2FormerImageProcessorPil())]:
        expected = reference(image, return_tensors="pt")
        difference = max_abs_difference(expected["pixel_values"], our_result["pixel_values"])
        masks_equal = torch.equal(expected["pixel_mask"], our_result["pixel_mask"])
        bench.compare(f"preprocess 640x480 -> 800x1088 vs {name}", lambda: reference(image, return_tensors="pt"),
                      lambda: ours(image, return_tensors="pt"),
                      f"pixel_values max |diff| {difference:.2e}, pixel_mask equal {masks_equal}",
                      repeats=repeats * 5)


def bench_post_processing(bench: Bench, transformers_module: Any, repeats: int) -> None:
    import m2f_model.post_processing as post_processing

    transformers_module.logging.set_verbosity_error()
    reference = transformers_module.Mask2FormerImageProcessor()
    outputs = realistic_outputs(seed=0)
    target_sizes = [(480, 640)]
    stuff = set(range(COCO_THING_LABELS, COCO_PANOPTIC_LABELS))
    cases = [
        ("post_process_semantic_segmentation", {"target_sizes": target_sizes}),
        ("post_process_instance_segmentation", {"target_sizes": target_sizes}),
        ("post_process_instance_segmentation", {"target_sizes": target_sizes, "return_coco_annotation": True}),
        ("post_process_panoptic_segmentation", {"target_sizes": target_sizes, "label_ids_to_fuse": stuff}),
    ]
    for method, kwargs in cases:
        reference_call = lambda: getattr(reference, method)(outputs, **kwargs)  # noqa: E731
        our_call = lambda: getattr(post_processing, method)(outputs, **kwargs)  # noqa: E731
        expected, actual = reference_call(), our_call()
        difference = max_abs_difference(expected, actual)
        segments = len(expected[0]["segments_info"]) if isinstance(expected[0], dict) else "-"
        options = ",".join(key for key in kwargs if key != "target_sizes") or "defaults"
        bench.compare(f"{method.replace('post_process_', '')} ({options})", reference_call, our_call,
                      f"outputs equal {difference == 0.0} (segments {segments})", repeats=repeats)


# ------------------------------------------------------------------------------------- forward on a device
class DeviceReport:
    """Prints each result and appends it to <output_dir>/forward.jsonl and report.txt at once, so a run cut
    short keeps what it measured; longer texts (profiles) go to files of their own."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        os.makedirs(output_dir, exist_ok=True)

    def line(self, text: str, record: dict[str, Any] | None = None) -> None:
        print(text, flush=True)
        with open(os.path.join(self.output_dir, "report.txt"), "a") as report:
            report.write(text + "\n")
        if record is not None:
            with open(os.path.join(self.output_dir, "forward.jsonl"), "a") as records:
                records.write(json.dumps(record) + "\n")

    def text_file(self, name: str, text: str) -> None:
        with open(os.path.join(self.output_dir, name), "w") as file:
            file.write(text)
        print(f"wrote {os.path.join(self.output_dir, name)}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_device_memory_mib(function: Callable[[], Any], device: torch.device) -> float:
    """Peak of allocated device memory during one call, above what was allocated before it (NaN off CUDA)."""
    if device.type != "cuda":
        return float("nan")
    gc.collect()
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = function()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return (peak - before) / 2 ** 20


def host_synchronisations(function: Callable[[], Any], device: torch.device) -> list[str] | None:
    """Messages of CUDA's sync debug mode during one call: each is the host waiting for the device (None off CUDA)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(warning.message).splitlines()[0] for warning in caught if "synchroniz" in str(warning.message)]


def kernel_profile(function: Callable[[], Any], device: torch.device, rows: int = 30) -> str:
    """torch.profiler table of one call, the ops with the most self time on the device (CPU off CUDA) first."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        function()
        synchronize(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows)


def logits_difference(expected: Any, actual: Any) -> float:
    return max(max_abs_difference(expected.class_queries_logits.float(), actual.class_queries_logits.float()),
               max_abs_difference(expected.masks_queries_logits.float(), actual.masks_queries_logits.float()))


def bench_forward_on_device(report: DeviceReport, transformers_module: Any, *, device: torch.device,
                            dtype: torch.dtype, models: list[str], sizes: list[tuple[int, int]], batches: list[int],
                            repeats: int, warmup: int, compile_batches: list[int], compile_mode: str,
                            profile_batch: int | None) -> None:
    """Ours vs transformers (eager) on the same weights and inputs, in `dtype` on `device`; see the module doc."""
    from m2f_model import Mask2FormerForUniversalSegmentation

    dtype_name = str(dtype).removeprefix("torch.")
    for model_name in models:
        torch.manual_seed(0)
        reference_model = transformers_module.Mask2FormerForUniversalSegmentation(
            mask2former_config(transformers_module, model_name)).eval()
        with tempfile.TemporaryDirectory() as directory:
            reference_model.save_pretrained(directory)
            float32_model = Mask2FormerForUniversalSegmentation.from_pretrained(directory).eval().to(device)
        reference_model.to(device=device, dtype=dtype)
        our_model = float32_model if dtype == torch.float32 else copy.deepcopy(float32_model).to(dtype)
        compiled_model = None
        for height, width in sizes:
            for batch in batches:
                name = f"{model_name} {height}x{width} batch {batch} {dtype_name}"
                pixel_values = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
                pixel_values = pixel_values.to(device)
                typed_values = pixel_values.to(dtype)
                with torch.inference_mode():
                    float32_output = float32_model(pixel_values=pixel_values)
                    ours = lambda: our_model(pixel_values=typed_values)  # noqa: E731
                    theirs = lambda: reference_model(pixel_values=typed_values)  # noqa: E731
                    our_output, their_output = ours(), theirs()
                    differences = {"ours_vs_ours_float32": logits_difference(float32_output, our_output),
                                   "transformers_vs_ours_float32": logits_difference(float32_output, their_output),
                                   "ours_vs_transformers": logits_difference(their_output, our_output)}
                    del their_output
                    their_timing, our_timing = measure_pair(lambda: (theirs(), synchronize(device)),
                                                            lambda: (ours(), synchronize(device)), repeats, warmup)
                    their_peak, our_peak = peak_device_memory_mib(theirs, device), peak_device_memory_mib(ours, device)
                    synchronisations = host_synchronisations(ours, device)
                    record = {"model": model_name, "height": height, "width": width, "batch": batch,
                              "dtype": dtype_name, "device": str(device), "compiled": False,
                              "images_per_s_ours": batch / our_timing.wall_s,
                              "images_per_s_transformers": batch / their_timing.wall_s,
                              "ratio": their_timing.wall_s / our_timing.wall_s,
                              "peak_mib_ours": our_peak, "peak_mib_transformers": their_peak,
                              "host_synchronisations_ours": synchronisations, **differences}
                    report.line(f"{name:<36} eager     ours {record['images_per_s_ours']:8.2f} img/s | transformers "
                                f"{record['images_per_s_transformers']:8.2f} img/s | ratio {record['ratio']:5.2f}x | "
                                f"max|diff| ours-vs-fp32 {differences['ours_vs_ours_float32']:.2e} transformers-vs-"
                                f"fp32 {differences['transformers_vs_ours_float32']:.2e} ours-vs-transformers "
                                f"{differences['ours_vs_transformers']:.2e} | peak MiB ours {our_peak:.0f} "
                                f"transformers {their_peak:.0f} | host syncs "
                                f"{'n/a' if synchronisations is None else len(synchronisations)}", record)
                    if profile_batch == batch:
                        for side, function in (("ours", ours), ("transformers", theirs)):
                            report.text_file(f"profile-{model_name}-{height}x{width}-b{batch}-{dtype_name}-{side}.txt",
                                             kernel_profile(function, device))
                    if batch in compile_batches:
                        if compiled_model is None:
                            torch._dynamo.reset()
                            compiled_model = torch.compile(our_model, mode=compile_mode, dynamic=False)
                        compiled = lambda: compiled_model(pixel_values=typed_values)  # noqa: E731
                        start = time.perf_counter()
                        compiled_output = compiled()
                        synchronize(device)
                        compile_s = time.perf_counter() - start
                        compiled_difference = logits_difference(our_output, compiled_output)
                        compiled_float32_difference = logits_difference(float32_output, compiled_output)
                        del compiled_output
                        their_timing, compiled_timing = measure_pair(
                            lambda: (theirs(), synchronize(device)), lambda: (compiled(), synchronize(device)),
                            repeats, warmup)
                        compiled_peak = peak_device_memory_mib(compiled, device)
                        record = {**record, "compiled": True, "compile_mode": compile_mode, "compile_s": compile_s,
                                  "images_per_s_ours": batch / compiled_timing.wall_s,
                                  "images_per_s_transformers": batch / their_timing.wall_s,
                                  "ratio": their_timing.wall_s / compiled_timing.wall_s,
                                  "peak_mib_ours": compiled_peak, "compiled_vs_ours_eager": compiled_difference,
                                  "compiled_vs_ours_float32": compiled_float32_difference,
                                  "host_synchronisations_ours": None}
                        report.line(f"{name:<36} compiled  ours {record['images_per_s_ours']:8.2f} img/s | "
                                    f"transformers (eager) {record['images_per_s_transformers']:8.2f} img/s | ratio "
                                    f"{record['ratio']:5.2f}x | compile {compile_s:.1f} s | max|diff| vs ours eager "
                                    f"{compiled_difference:.2e} vs ours fp32 {compiled_float32_difference:.2e} | "
                                    f"peak MiB {compiled_peak:.0f}", record)
                    del our_output, float32_output
        del reference_model, float32_model, our_model, compiled_model
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(side) for side in size.split("x")) for size in text.split(",")]


def run_device_report(arguments: argparse.Namespace, transformers_module: Any) -> None:
    device = torch.device(arguments.device)
    dtype = getattr(torch, arguments.dtype)
    quick = arguments.quick
    models = arguments.models.split(",") if arguments.models else (["swin-t"] if quick else ["swin-t", "swin-l"])
    sizes = parse_sizes(arguments.sizes or ("96x128" if quick else "800x1088"))
    batches = [int(b) for b in (arguments.batches or ("1,2" if quick else "1,8,16")).split(",")]
    compile_batches = [int(b) for b in arguments.compile_batches.split(",")] if arguments.compile_batches else \
        [max(batches)]
    profile_batch = arguments.profile_batch if arguments.profile_batch is not None else \
        sorted(batches)[len(batches) // 2]
    repeats = arguments.repeats or (2 if quick else 10)
    warmup = arguments.warmup if arguments.warmup is not None else (1 if quick else 3)
    report = DeviceReport(arguments.output_dir or os.path.join(
        "out", f"bench-model-{device.type}-{arguments.dtype}-{time.strftime('%Y%m%d-%H%M%S')}"))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    report.line(f"torch {torch.__version__}, transformers {transformers_module.__version__}, {gpu}, {arguments.dtype}, "
                f"median of {repeats} after {warmup} warm-up calls; TF32 matmul "
                f"{torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}; "
                f"ratio = transformers time / ours; results in {report.output_dir}")
    bench_forward_on_device(report, transformers_module, device=device, dtype=dtype, models=models, sizes=sizes,
                            batches=batches, repeats=repeats, warmup=warmup,
                            compile_batches=compile_batches if arguments.compile else [],
                            compile_mode=arguments.compile_mode, profile_batch=profile_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="384x384 batch 1 forward only, fewer repeats")
    parser.add_argument("--skip-forward", action="store_true", help="only pre- and post-processing")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measure (median reported)")
    parser.add_argument("--skip-memory", action="store_true", help="no peak-memory child run")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    device_options = parser.add_argument_group("forward report on a device (selected by --device)")
    device_options.add_argument("--device", default=None, help="cuda / cuda:N / cpu: run the forward report")
    device_options.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    device_options.add_argument("--compile", action="store_true", help="also ours under torch.compile")
    device_options.add_argument("--compile-mode", default="default",
                                choices=["default", "reduce-overhead", "max-autotune"])
    device_options.add_argument("--compile-batches", default=None, help="batches timed compiled (default: largest)")
    device_options.add_argument("--models", default=None, help="swin-t,swin-l (default both; swin-t with --quick)")
    device_options.add_argument("--sizes", default=None, help="HxW,... (default 800x1088; 96x128 with --quick)")
    device_options.add_argument("--batches", default=None, help="default 1,8,16 (1,2 with --quick)")
    device_options.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (3; 1 quick)")
    device_options.add_argument("--profile-batch", type=int, default=None,
                                help="batch whose kernels are profiled (default: the middle one; 0: none)")
    device_options.add_argument("--output-dir", default=None, help="default out/bench-model-<device>-<dtype>-<time>")
    arguments = parser.parse_args()

    import transformers

    transformers.utils.logging.disable_progress_bar()
    if arguments.device is not None:
        run_device_report(arguments, transformers)
        return
    torch.set_num_threads(NUM_THREADS)
    repeats = arguments.repeats or (3 if arguments.quick else 7)
    peaks: dict[str, list[float]] = {}
    if not arguments.memory_child:
        if not arguments.skip_memory:
            forwarded = [flag for flag, on in (("--quick", arguments.quick), ("--skip-forward", arguments.skip_forward))
                         if on]
            peaks = measure_peaks_in_child(forwarded)
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, {NUM_THREADS} threads, "
              f"median of {repeats} after warm-up; ratio = transformers time / ours", flush=True)
    bench = Bench(memory_child=arguments.memory_child, peaks=peaks)
    bench_preprocessing(bench, transformers, repeats)
    bench_post_processing(bench, transformers, repeats)
    if not arguments.skip_forward:
        sizes = [(384, 384)] if arguments.quick else [(384, 384), (800, 1088)]
        batches = [1] if arguments.quick else [1, 4]
        bench_forward(bench, transformers, sizes, batches, repeats)


if __name__ == "__main__":
    main()
