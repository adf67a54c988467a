"""Training-step speed of m2f_model against transformers' Mask2Former on the same weights and batch, in one run.

A step is what the fine-tuning loop does (training/train_step.py, shared by both sides): forward under autocast
(bf16 by default on CUDA, float32 on CPU), the loss in float32 (Hungarian matching, point-sampled mask losses,
auxiliary losses of every decoder layer), backward, gradient clipping and an AdamW step. The transformers model is
built with random weights and saved; ours loads that directory, so both start from the same weights. Steps
alternate between the two (one of theirs, one of ours) so that load changes on a shared machine hit both alike.

Prints images/s (batch / median step time) of both and the ratio ours / transformers, and peak memory per step:
on CUDA the allocator's peak during a step (and its growth above the memory held before the step), on CPU the
growth of the process's peak resident set during one step (approximate: freed memory may be reused).

    python benchmarks/train_step.py --model tiny --size 128 --batch-size 2 --steps 3        # seconds on a CPU
    python benchmarks/train_step.py --device cuda --batch-size 8 --steps 20                # Swin-T COCO, 1024^2 bf16
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infra.processes import status_kib  # noqa: E402
from training.train_step import optimizer_step, segmentation_loss  # noqa: E402

COCO_PANOPTIC_LABELS = 133
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def reference_config(transformers_module: Any, model: str) -> Any:
    """Swin-T COCO panoptic (transformers' defaults: 100 queries, 12544 loss points) or a tiny configuration."""
    if model == "swin-t-coco":
        backbone = transformers_module.SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                                                  window_size=7, out_features=["stage1", "stage2", "stage3",
                                                                               "stage4"])
        return transformers_module.Mask2FormerConfig(backbone_config=backbone, num_labels=COCO_PANOPTIC_LABELS)
    backbone = transformers_module.SwinConfig(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
                                              window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    return transformers_module.Mask2FormerConfig(backbone_config=backbone, num_labels=5, feature_size=64,
                                                 mask_feature_size=64, hidden_dim=64, encoder_feedforward_dim=128,
                                                 dim_feedforward=128, decoder_layers=4, num_queries=20,
                                                 train_num_points=1024)


def synthetic_batch(batch_size: int, size: int, num_labels: int, device: torch.device, seed: int = 0
                    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Normalised-looking pixels and, per image, 2-6 rectangles of random classes as target masks."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    mask_labels, class_labels = [], []
    for _ in range(batch_size):
        count = int(torch.randint(2, 7, (1,), generator=generator))
        masks = torch.zeros(count, size, size)
        for index in range(count):
            top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            height, width = torch.randint(size // 8, size // 2, (2,), generator=generator).tolist()
            masks[index, top:top + height, left:left + width] = 1
        mask_labels.append(masks.to(device))
        class_labels.append(torch.randint(0, num_labels, (count,), generator=generator).to(device))
    return pixel_values.to(device), mask_labels, class_labels


class Side:
    """One model with its optimizer (and a gradient scaler for float16), stepping on the shared batch."""

    def __init__(self, name: str, model: torch.nn.Module, amp_dtype: torch.dtype | None, device: torch.device
                 ) -> None:
        self.name = name
        self.model = model.to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, weight_decay=0.05)
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        self.amp_dtype = amp_dtype
        self.device = device
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.peaks_mib: list[float] = []
        self.growth_mib: list[float] = []

    def step(self, batch: tuple, *, record: bool) -> None:
        torch.manual_seed(1)  # the same loss points on both sides
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            held = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            held = status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets VmHWM to the current RSS
        started = time.perf_counter()
        loss, _ = segmentation_loss(self.model, *batch, amp_dtype=self.amp_dtype)
        optimizer_step(loss, self.model, self.optimizer, self.scaler, gradient_clip=1.0)
        loss_value = float(loss.detach())  # waits for the device
        if cuda:
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else status_kib("VmHWM") * 1024
        if record:
            self.seconds.append(elapsed)
            self.losses.append(loss_value)
            self.peaks_mib.append(peak / 2 ** 20)
            self.growth_mib.append((peak - held) / 2 ** 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="autocast dtype of the forward (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--model", choices=["swin-t-coco", "tiny"], default="swin-t-coco")
    parser.add_argument("--size", type=int, default=1024, help="square crop size")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    dtype_name = arguments.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    amp_dtype = DTYPES[dtype_name]

    import transformers

    from m2f_model import Mask2FormerForUniversalSegmentation

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    reference_model = transformers.Mask2FormerForUniversalSegmentation(
        reference_config(transformers, arguments.model))
    with tempfile.TemporaryDirectory() as directory:
        reference_model.save_pretrained(directory)
        our_model = Mask2FormerForUniversalSegmentation.from_pretrained(directory)
    sides = [Side("transformers", reference_model, amp_dtype, device), Side("ours", our_model, amp_dtype, device)]
    batch = synthetic_batch(arguments.batch_size, arguments.size, reference_model.config.num_labels, device)

    print(f"train step, {arguments.model} {arguments.size}x{arguments.size} batch {arguments.batch_size}, "
          f"{device} {dtype_name}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} CPU threads; median of {arguments.steps} steps after {arguments.warmup} "
          f"warm-up, alternating", flush=True)
    for index in range(arguments.warmup + arguments.steps):
        for side in sides:
            side.step(batch, record=index >= arguments.warmup)

    figures: dict[str, Any] = {"model": arguments.model, "size": arguments.size, "batch_size": arguments.batch_size,
                               "device": str(device), "dtype": dtype_name, "steps": arguments.steps}
    for side in sides:
        median = statistics.median(side.seconds)
        figures[side.name] = {"images_per_s": arguments.batch_size / median, "median_step_s": median,
                              "min_step_s": min(side.seconds), "peak_mib": max(side.peaks_mib),
                              "step_growth_mib": max(side.growth_mib), "first_loss": side.losses[0],
                              "last_loss": side.losses[-1]}
        row = figures[side.name]
        memory = (f"peak {row['peak_mib']:.0f} MiB allocated (+{row['step_growth_mib']:.0f} in the step)"
                  if device.type == "cuda" else f"peak RSS +{row['step_growth_mib']:.0f} MiB in the step")
        print(f"{side.name:<13} {row['images_per_s']:8.3g} images/s  median step {median * 1e3:9.1f} ms "
              f"(min {row['min_step_s'] * 1e3:9.1f})  {memory}  loss {row['first_loss']:.3f} -> "
              f"{row['last_loss']:.3f}", flush=True)
    figures["ratio_images_per_s"] = figures["ours"]["images_per_s"] / figures["transformers"]["images_per_s"]
    print(f"ratio ours / transformers: {figures['ratio_images_per_s']:.2f}x images/s", flush=True)
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
