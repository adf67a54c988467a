"""The training step's backward pass under bfloat16 / float16 autocast, on every device present (CPU here, CUDA
too where there is one): every gradient is finite and close to the float32 one.

The discrete decisions are pinned so that the float32 and the autocast runs differentiate the same function: the
Hungarian matching and the decoder's attention masks are taken from the float32 run (at random init the queries
are nearly tied and the mask logits sit at the attention threshold, so half-precision rounding flips them), and
the loss points are uniform draws only (uncertainty-ranked points depend on the logits). The sampling offsets are
moved off whole pixels: bilinear interpolation has a kink at each pixel centre, where rounding picks either side's
slope. On CPU the half-precision sampling had a backward too; the CUDA cases guard against the GPU failure
"_embedding_bag_per_sample_weights_backward_cuda not implemented for 'BFloat16'".
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

from m2f_model import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
from m2f_model.pixel_decoder import LevelGeometry, multi_scale_deformable_attention
from tiny_checkpoints import tiny_config_kwargs
from training.train_step import segmentation_loss

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Per parameter: |grad - grad_float32| <= GRADIENT_TOLERANCE * (|grad_float32| + 0.1 * largest |grad_float32|),
# norms over the parameter's elements. Seen here: at most 0.05 (bfloat16) and 0.04 (float16), in the backbone
# weights whose gradients are largest; a missing or wrong gradient gives about 1. The floor covers gradients that
# are zero in exact arithmetic (a key projection's bias under softmax, a bias before GroupNorm): rounding noise.
GRADIENT_TOLERANCE = 0.1

class Pinned(nn.Module):
    """Wraps a module that takes discrete decisions: records its outputs, then (replaying) still runs it, so that
    random draws stay in step, but hands back `keep(recorded, fresh)`."""

    def __init__(self, module: nn.Module, keep: Callable[[Any, Any], Any]) -> None:
        super().__init__()
        self.module = module
        self.keep = keep
        self.recorded: list = []
        self.replaying = False

    def forward(self, *args, **kwargs):
        fresh = self.module(*args, **kwargs)
        if not self.replaying:
            self.recorded.append(fresh)
            return fresh
        return self.keep(self.recorded.pop(0), fresh)


def _model_and_batch(device: str):
    torch.manual_seed(0)
    config = Mask2FormerConfig(**tiny_config_kwargs(importance_sample_ratio=0.0))
    model = Mask2FormerForUniversalSegmentation(config).to(device).train()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("sampling_offsets.bias"):
                parameter.add_(0.3)
    model.criterion.matcher = Pinned(model.criterion.matcher, keep=lambda recorded, fresh: recorded)
    # (mask logits, attention mask): at random init the logits sit near the attention threshold
    decoder = model.model.transformer_module.decoder
    decoder.mask_predictor = Pinned(decoder.mask_predictor, keep=lambda recorded, fresh: (fresh[0], recorded[1]))
    pixel_values = torch.randn(2, 3, 64, 64, device=device)
    masks = torch.zeros(3, 64, 64, device=device)
    masks[0, 4:30, 6:28] = 1
    masks[1, 30:60, 20:50] = 1
    masks[2] = 1 - masks[0] - masks[1]
    mask_labels = [masks, masks.flip(-1)]
    class_labels = [torch.tensor([0, 1, 3], device=device)] * 2
    return model, (pixel_values, mask_labels, class_labels)


def _loss_and_gradients(model, batch, amp_dtype):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss, _ = segmentation_loss(model, *batch, amp_dtype=amp_dtype)
    loss.backward()
    return loss.detach(), {name: p.grad.detach().float() for name, p in model.named_parameters()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_autocast_backward_gives_finite_gradients_close_to_float32(device, amp_dtype):
    model, batch = _model_and_batch(device)
    reference_loss, reference = _loss_and_gradients(model, batch, None)
    for pinned in (model.criterion.matcher, model.model.transformer_module.decoder.mask_predictor):
        pinned.replaying = True
    loss, gradients = _loss_and_gradients(model, batch, amp_dtype)

    assert torch.isfinite(loss) and abs(loss - reference_loss) <= 0.02 * reference_loss
    largest = max(gradient.norm() for gradient in reference.values())
    assert largest > 0
    far = {}
    for name, expected in reference.items():
        assert torch.isfinite(gradients[name]).all(), f"{name}: non-finite gradient under {amp_dtype}"
        error = (gradients[name] - expected).norm() / (expected.norm() + 0.1 * largest)
        if error > GRADIENT_TOLERANCE:
            far[name] = f"{error:.3f}"
    assert not far, f"gradients under {amp_dtype} on {device} far from float32: {far}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_deformable_sampling_gradients_under_autocast_match_float32(device, amp_dtype):
    torch.manual_seed(0)
    shapes = [(2, 3), (4, 5), (8, 10)]
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(2, tokens, 2, 8, device=device)
    # positions inside and around every level, none on a pixel centre (the interpolation's kinks)
    pixels = torch.rand(2, 7, 2, 3, 4, 2, device=device) * 12 - 1.5
    pixels = torch.where((pixels - pixels.round()).abs() < 0.05, pixels + 0.1, pixels)
    weights = torch.rand(2, 7, 2, 3, 4, device=device).softmax(-1)
    upstream = torch.randn(2, 7, 16, device=device)

    def gradients(dtype):
        inputs = [tensor.clone().requires_grad_() for tensor in (value, pixels, weights)]
        cast = [tensor.to(dtype) for tensor in inputs]
        geometry = LevelGeometry(shapes, torch.device(device), dtype)
        output = multi_scale_deformable_attention(cast[0], geometry, cast[1], cast[2])
        assert output.dtype == dtype
        (output.float() * upstream).sum().backward()
        return [tensor.grad for tensor in inputs]

    with torch.autocast(device_type=device, dtype=amp_dtype):
        reduced = gradients(amp_dtype)
    for name, expected, got in zip(("value", "positions", "attention"), gradients(torch.float32), reduced):
        assert torch.isfinite(got).all()
        # the inputs are rounded to amp_dtype once, the sampling runs in float32: seen 1.5-2.6 eps here
        assert (got - expected).norm() <= 4 * torch.finfo(amp_dtype).eps * expected.norm(), name

