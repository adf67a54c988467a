"""The driver side of fine-tuning: builds the Ray Train `TorchTrainer`, runs it, exports the final model.

    result = run_finetune(FinetuneConfig(data="data/shapes", model_config={...}, image_size=128),
                          num_workers=2, storage_path="runs", name="shapes", output_model="models/x")

The exported directory is a transformers-layout checkpoint (config.json with id2label, model.safetensors,
preprocessor_config.json) plus history.json (per-step metrics) and loss_curve.png.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from pipeline.storage import StorageConfig
from training.train_loop import HISTORY_NAME, FinetuneConfig, train_loop_per_worker

__all__ = ["run_finetune", "export_checkpoint", "plot_loss_curve", "storage_for_ray", "MODEL_FILES"]

MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def storage_for_ray(storage_path: str, storage: StorageConfig | dict | None = None) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: local paths made absolute; a URI goes through the same
    storage layer as the data (`--storage-options` over the AWS_* variables), wrapped as a pyarrow filesystem."""
    return StorageConfig.coerce(storage).pyarrow_filesystem(storage_path)


def _absolute_if_local(path_or_uri: str) -> str:
    if "://" in path_or_uri and not path_or_uri.startswith("file://"):
        return path_or_uri
    return os.path.abspath(path_or_uri.removeprefix("file://"))


def run_finetune(config: FinetuneConfig, *, num_workers: int = 2, use_gpu: bool = False,
                 cpus_per_worker: float = 1.0, storage_path: str = "runs", name: str = "m2f-finetune",
                 max_failures: int = 2, keep_checkpoints: int = 2, output_model: str | None = None) -> Any:
    """Runs `train_loop_per_worker` on `num_workers` Ray Train workers; returns ray.train.Result.

    Re-running with the same storage_path and name continues the run from its latest checkpoint; a worker
    that dies mid-run restarts the worker group from the last checkpoint (up to `max_failures` times).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train workers run in their own working directory: local paths must be absolute.
    config = dataclasses.replace(config, data=_absolute_if_local(config.data),
                                 init_from=_absolute_if_local(config.init_from) if config.init_from else None)
    path, filesystem = storage_for_ray(storage_path, config.storage)
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints)),
    )
    result = trainer.fit()
    if output_model is not None:
        if result.checkpoint is None:
            raise RuntimeError(f"training run {name} under {storage_path} finished without a checkpoint; "
                               f"nothing to export to {output_model}")
        export_checkpoint(result.checkpoint, output_model)
    return result


def export_checkpoint(checkpoint: Any, output_model: str | os.PathLike) -> Path:
    """Copies the model files of a Ray checkpoint into `output_model` and draws its loss curve there."""
    output = Path(output_model)
    output.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        missing = [name for name in MODEL_FILES if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {checkpoint.path} lacks {missing}; was it written by "
                                    f"training.train_loop?")
        for name in (*MODEL_FILES, HISTORY_NAME):
            if (directory / name).is_file():
                shutil.copyfile(directory / name, output / name)
    if (output / HISTORY_NAME).is_file():
        plot_loss_curve(json.loads((output / HISTORY_NAME).read_text()), output / "loss_curve.png")
    return output


def plot_loss_curve(history: Sequence[dict], path: str | os.PathLike, *, smoothing: int = 25) -> Path:
    """Total loss and its parts per step (moving average over `smoothing` steps), and the learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not history:
        raise ValueError("no training history to plot")
    steps = np.array([row["step"] for row in history])
    figure, (losses_axis, lr_axis) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                                  gridspec_kw={"height_ratios": [3, 1]})
    names = ["loss"] + sorted(k for k in history[0] if k.startswith("loss_"))
    window = max(1, min(smoothing, len(history) // 5 or 1))
    for name in names:
        values = np.array([row.get(name, np.nan) for row in history], dtype=float)
        smoothed = np.convolve(values, np.ones(window) / window, mode="valid")
        losses_axis.plot(steps[window - 1:], smoothed, label=name, linewidth=1.5 if name == "loss" else 1.0)
    losses_axis.set_yscale("log")
    losses_axis.set_ylabel(f"loss (moving average, {window} steps)")
    losses_axis.legend(fontsize=8)
    losses_axis.grid(alpha=0.3)
    lr_axis.plot(steps, [row["learning_rate"] for row in history], color="black")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("step")
    lr_axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)
