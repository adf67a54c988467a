"""One optimisation step of Mask2Former, as the Ray Train loop, the train-step benchmark and the tests run it.

The forward pass runs under autocast (bfloat16 where the GPU supports it, else float16 with a gradient scaler);
the loss runs in float32 outside autocast, because the matcher's costs and the point losses need the precision.
Works for any model with transformers' Mask2Former training API (`get_loss_dict`, `get_loss`), ours or
transformers' own.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["autocast_dtype", "segmentation_loss", "optimizer_step"]


def autocast_dtype(device: torch.device, *, mixed_precision: bool) -> torch.dtype | None:
    """The autocast dtype for training on `device`, or None for float32 (CPU training stays in float32)."""
    if not mixed_precision or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def segmentation_loss(model: torch.nn.Module, pixel_values: torch.Tensor, mask_labels: list[torch.Tensor],
                      class_labels: list[torch.Tensor], *, amp_dtype: torch.dtype | None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total loss, weighted losses by name) of one batch: forward under autocast(amp_dtype), loss in float32.

    pixel_values: (B, 3, H, W) on the model's device; mask_labels: per image (T_i, H, W); class_labels: per image
    (T_i,). `model` may be wrapped in DistributedDataParallel (the forward goes through the wrapper).
    """
    unwrapped = model.module if hasattr(model, "module") else model
    precision = (torch.autocast(device_type=pixel_values.device.type, dtype=amp_dtype) if amp_dtype is not None
                 else contextlib.nullcontext())
    with precision:
        outputs = model(pixel_values=pixel_values, output_auxiliary_logits=True)
    auxiliary = [{name: logits.float() for name, logits in layer.items()} for layer in outputs.auxiliary_logits]
    loss_dict = unwrapped.get_loss_dict(outputs.masks_queries_logits.float(), outputs.class_queries_logits.float(),
                                        mask_labels, class_labels, auxiliary)
    return unwrapped.get_loss(loss_dict), loss_dict


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: Any | None, *, gradient_clip: float) -> torch.Tensor:
    """Backward, gradient clipping to `gradient_clip` (total norm) and the optimizer step; returns the gradient
    norm before clipping. With a `torch.amp.GradScaler` (float16) the loss is scaled and the gradients unscaled
    before clipping; the scaler skips the step when they are not finite."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    gradient_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), gradient_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return gradient_norm
