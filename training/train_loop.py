"""The Ray Train worker loop for Mask2Former fine-tuning (`train_loop_per_worker`) and its checkpoint state.

Every worker builds the same model, dataset and optimizer; `ray.train.torch.prepare_model` wraps the model in
DistributedDataParallel. Each worker reads its own shard of every epoch's shuffled order. A checkpoint is a
transformers-layout model directory (config.json with id2label, model.safetensors, preprocessor_config.json)
plus `training_state.pt` (optimizer, scheduler, step) and `history.json` (the per-step metrics so far), so a
restarted worker group continues from the last checkpoint at the same step with the same learning rate.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.storage import StorageConfig, is_local_uri, local_path

__all__ = ["FinetuneConfig", "train_loop_per_worker", "build_model_and_processor", "poly_lr_factor",
           "local_directory", "TRAINING_STATE_NAME", "HISTORY_NAME", "BACKBONE_PREFIX"]

TRAINING_STATE_NAME = "training_state.pt"
HISTORY_NAME = "history.json"
BACKBONE_PREFIX = "model.pixel_level_module.encoder."
# Not decayed: norms and biases (1-D) and learned embeddings, as in the reference recipe.
_NO_DECAY_NAME_PARTS = ("queries_embedder", "queries_features", "level_embed", "position_embeddings",
                        "relative_position_bias_table")


@dataclass
class FinetuneConfig:
    """Everything a worker needs; travels to the workers as a plain dict (`asdict`)."""

    data: str
    train_split: str = "train"
    task: str = "panoptic"
    init_from: str | None = None  # a transformers-layout checkpoint directory
    model_config: dict | None = None  # Mask2FormerConfig kwargs, for training from scratch
    image_size: int | None = None  # fixed processor size for a scratch model; init_from keeps its processor
    storage_options: dict | None = None  # --storage-options: explicit s3fs options
    # Resolved once on the driver (storage_options over its AWS_* variables); travels to the workers as a dict.
    storage: StorageConfig | dict | None = None
    batch_size: int = 4  # per worker
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    learning_rate: float = 1e-4
    backbone_lr_multiplier: float = 0.1
    weight_decay: float = 0.05
    warmup_steps: int = 50
    poly_power: float = 0.9
    gradient_clip: float = 1.0
    mixed_precision: bool = True  # on GPU only
    augment: bool = True
    min_scale: float = 0.8
    max_scale: float = 1.25
    checkpoint_every: int = 200
    loader_workers: int = 0
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.storage = StorageConfig.coerce(self.storage if self.storage is not None else self.storage_options)

    def to_dict(self) -> dict:
        return asdict(self)


def poly_lr_factor(step: int, *, total_steps: int, warmup_steps: int, power: float) -> float:
    """Multiplier of the base learning rate at `step`: linear warm-up, then (1 - progress) ** power."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 1.0 - progress) ** power


def local_directory(uri: str, storage: StorageConfig | dict | None) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A local path for a checkpoint directory given as a path or URI (s3://... is downloaded to a temporary
    folder, returned second so the caller can clean it up)."""
    if is_local_uri(uri):
        return local_path(uri), None
    download = tempfile.TemporaryDirectory(prefix="m2f-init-")
    StorageConfig.coerce(storage).download_directory(uri, download.name)
    return download.name, download


def build_model_and_processor(config: FinetuneConfig, id2label: dict[int, str]) -> tuple[Any, Any]:
    """A model for `id2label`: from `init_from` (re-initialising only the class head when the labels differ)
    or from `model_config` (random init). Returns (model, processor)."""
    from m2f_model import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor
    from m2f_model.checkpoints import load_checkpoint_state_dict, load_state_dict_into

    label2id = {name: label for label, name in id2label.items()}
    if config.init_from:
        local, download = local_directory(config.init_from, config.storage)
        try:
            init_config = Mask2FormerConfig.from_pretrained(local)
            old_labels = {int(k): v for k, v in init_config.id2label.items()}
            model_config = Mask2FormerConfig.from_pretrained(local, id2label=dict(id2label), label2id=label2id)
            model_config.num_labels = len(id2label)
            model = Mask2FormerForUniversalSegmentation(model_config)
            state_dict, source = load_checkpoint_state_dict(local)
            head = ("class_predictor.", "criterion.")
            if old_labels != id2label:
                state_dict = {k: v for k, v in state_dict.items() if not k.startswith(head)}
            report = load_state_dict_into(model, state_dict, source=source, strict=False)
            not_head = [k for k in report["missing"] + report["mismatched"] if not k.startswith(head)]
            if not_head or report["unexpected"]:
                raise ValueError(f"{config.init_from} does not fit its own config.json: missing/mismatched "
                                 f"{not_head[:10]}, unexpected {report['unexpected'][:10]}")
            if (Path(local) / "preprocessor_config.json").is_file():
                processor = Mask2FormerImageProcessor.from_pretrained(local)
            else:
                processor = _fixed_size_processor(config.image_size or 384, len(id2label))
        finally:
            if download is not None:
                download.cleanup()
    elif config.model_config is not None:
        model_config = Mask2FormerConfig(**{**config.model_config, "id2label": dict(id2label),
                                            "label2id": label2id})
        model_config.num_labels = len(id2label)
        model = Mask2FormerForUniversalSegmentation(model_config)
        processor = _fixed_size_processor(config.image_size or 384, len(id2label))
    else:
        raise ValueError("give init_from (a checkpoint directory) or model_config (Mask2FormerConfig kwargs)")
    processor.num_labels = len(id2label)
    processor.ignore_index = 255 if getattr(processor, "ignore_index", None) is None else processor.ignore_index
    return model, processor


def _fixed_size_processor(size: int, num_labels: int) -> Any:
    from m2f_model import Mask2FormerImageProcessor

    return Mask2FormerImageProcessor(size={"height": size, "width": size}, ignore_index=255, num_labels=num_labels,
                                     do_reduce_labels=False)


def _parameter_groups(model: torch.nn.Module, config: FinetuneConfig) -> list[dict]:
    """AdamW groups: backbone at lr * backbone_lr_multiplier; no weight decay on 1-D tensors and embeddings."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        name = name.removeprefix("module.")
        is_backbone = name.startswith(BACKBONE_PREFIX)
        decays = parameter.ndim > 1 and not any(part in name for part in _NO_DECAY_NAME_PARTS)
        groups.setdefault((is_backbone, decays), []).append(parameter)
    return [{"params": params,
             "lr": config.learning_rate * (config.backbone_lr_multiplier if is_backbone else 1.0),
             "weight_decay": config.weight_decay if decays else 0.0}
            for (is_backbone, decays), params in groups.items()]


def _batches_of_epoch(dataset_length: int, *, epoch: int, rank: int, world_size: int, batch_size: int,
                      seed: int) -> list[list[int]]:
    """This worker's index batches for `epoch`: one shuffled order for all workers, strided by rank."""
    order = torch.randperm(dataset_length, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_worker = dataset_length // world_size
    mine = order[rank:per_worker * world_size:world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine) - batch_size + 1, batch_size)]


def _save_checkpoint(directory: Path, model: torch.nn.Module, processor: Any, optimizer: torch.optim.Optimizer,
                     scheduler: Any, scaler: Any, step: int, history: list[dict]) -> None:
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None}, directory / TRAINING_STATE_NAME)
    (directory / HISTORY_NAME).write_text(json.dumps(history))


def _loss_parts(loss_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Final-layer weighted losses by name, and all auxiliary (per decoder layer) losses summed."""
    final = {name: value for name, value in loss_dict.items() if not name.rsplit("_", 1)[-1].isdigit()}
    auxiliary = [value for name, value in loss_dict.items() if name not in final]
    parts = dict(final)
    if auxiliary:
        parts["loss_auxiliary"] = torch.stack(auxiliary).sum()
    return parts


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point: trains, reports metrics every step and a checkpoint every `checkpoint_every`."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from m2f_model import Mask2FormerForUniversalSegmentation
    from training.augmentation import ScaleCropFlip
    from training.collate import collate_segmentation_batch
    from training.loading import load_coco_dataset

    config = FinetuneConfig(**loop_config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)

    probe_processor = _fixed_size_processor(config.image_size or 384, 1)
    labels_dataset = load_coco_dataset(config.data, config.train_split, processor=probe_processor,
                                       task=config.task, storage_options=config.storage)
    id2label = dict(labels_dataset.id2label)

    checkpoint = ray.train.get_checkpoint()
    start_step, history, training_state = 0, [], None
    if checkpoint is not None:
        from m2f_model import Mask2FormerImageProcessor

        # A private copy per worker: ranks on one node share as_directory()'s download folder for a remote
        # checkpoint, and one rank was seen reading a half-written preprocessor_config.json there.
        with tempfile.TemporaryDirectory(prefix="m2f-resume-") as directory:
            checkpoint.to_directory(directory)
            model = Mask2FormerForUniversalSegmentation.from_pretrained(directory)
            processor = Mask2FormerImageProcessor.from_pretrained(directory)
            training_state = torch.load(Path(directory) / TRAINING_STATE_NAME, map_location="cpu",
                                        weights_only=False)
            history = json.loads((Path(directory) / HISTORY_NAME).read_text())
        start_step = int(training_state["step"])
        history = [row for row in history if row["step"] <= start_step]
    else:
        model, processor = build_model_and_processor(config, id2label)

    size = processor.size
    crop = (int(size["height"]), int(size["width"])) if "height" in size else None
    augmentation = (ScaleCropFlip(min_scale=config.min_scale, max_scale=config.max_scale, crop_size=crop,
                                  seed=config.seed) if config.augment else None)
    dataset = load_coco_dataset(config.data, config.train_split, processor=processor, augmentation=augmentation,
                                task=config.task, storage_options=config.storage)
    if rank == 0 and dataset.skipped:
        print(f"[finetune] {config.data} {config.train_split}: {dataset.skipped}")

    steps_per_epoch = len(dataset) // world_size // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{config.data} {config.train_split} has {len(dataset)} usable images: too few for "
                         f"{world_size} workers x batch size {config.batch_size}; lower --batch-size")
    total_steps = config.max_steps if config.max_steps is not None else config.epochs * steps_per_epoch

    model.train()
    model = ray.train.torch.prepare_model(model)
    unwrapped = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(_parameter_groups(model, config), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: poly_lr_factor(
        step, total_steps=total_steps, warmup_steps=config.warmup_steps, power=config.poly_power))
    use_amp = config.mixed_precision and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None
    if training_state is not None:
        optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
        if scaler is not None and training_state.get("scaler"):
            scaler.load_state_dict(training_state["scaler"])

    step = start_step
    started = time.time()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        batches = _batches_of_epoch(len(dataset), epoch=epoch, rank=rank, world_size=world_size,
                                    batch_size=config.batch_size, seed=config.seed)[offset:]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_segmentation_batch,
                                             num_workers=config.loader_workers)
        for batch in loader:
            pixel_values = batch["pixel_values"].to(device)  # (B, 3, H, W)
            mask_labels = [m.to(device) for m in batch["mask_labels"]]
            class_labels = [c.to(device) for c in batch["class_labels"]]
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                outputs = model(pixel_values=pixel_values, output_auxiliary_logits=True)
            # The loss runs in float32 outside autocast; the matcher's costs need the precision.
            loss_dict = unwrapped.get_loss_dict(
                outputs.masks_queries_logits.float(), outputs.class_queries_logits.float(), mask_labels,
                class_labels, [{k: v.float() for k, v in aux.items()} for aux in outputs.auxiliary_logits])
            loss = unwrapped.get_loss(loss_dict)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            gradient_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            step += 1

            parts = _loss_parts({k: v.detach() for k, v in loss_dict.items()})
            names = ["loss", *parts]
            values = torch.stack([loss.detach(), *parts.values()]).float()
            if world_size > 1 and dist.is_initialized():
                dist.all_reduce(values)
                values /= world_size
            metrics = {name: float(value) for name, value in zip(names, values.cpu())}
            metrics.update(step=step, epoch=epoch, learning_rate=max(scheduler.get_last_lr()),
                           gradient_norm=float(gradient_norm), seconds=time.time() - started)
            history.append(metrics)

            if step % config.checkpoint_every == 0 or step == total_steps:
                with tempfile.TemporaryDirectory(prefix="m2f-ckpt-") as directory:
                    saved = None
                    if rank == 0:
                        _save_checkpoint(Path(directory), unwrapped, processor, optimizer, scheduler, scaler, step,
                                         history)
                        saved = ray.train.Checkpoint.from_directory(directory)
                    ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=f"checkpoint_{step:07d}")
            else:
                ray.train.report(metrics)
            if rank == 0 and (step % 25 == 0 or step == start_step + 1):
                print(f"[finetune] step {step}/{total_steps} loss {metrics['loss']:.3f} "
                      f"lr {metrics['learning_rate']:.2e} {metrics['seconds']:.0f}s", flush=True)
            _maybe_fail_for_test(config, step, rank)
            if step >= total_steps:
                break


def _maybe_fail_for_test(config: FinetuneConfig, step: int, rank: int) -> None:
    """Test hook: extra={"fail_at_step": N, "fail_marker": path} kills rank 0's process once, at step N, so
    tests can watch Ray Train restart the workers from the last checkpoint."""
    fail_at, marker = config.extra.get("fail_at_step"), config.extra.get("fail_marker")
    if rank == 0 and fail_at is not None and step == int(fail_at) and marker and not os.path.exists(marker):
        Path(marker).write_text(f"killed at step {step}")
        os._exit(1)
