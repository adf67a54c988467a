"""Fixtures for the model tests: transformers reference checkpoints with random weights, padded image batches and a
field-by-field output comparison. Fixture names start with `model_` (shared directory with other test files)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from tiny_checkpoints import TINY_CONFIG_KWARGS, TINY_ID2LABEL

MODEL_PARITY_TOLERANCE = 1e-4

# The smallest configuration the model tests start from (the shared tiny one); tests override single fields.
MODEL_BASE_KWARGS: dict[str, Any] = {**TINY_CONFIG_KWARGS, "id2label": dict(TINY_ID2LABEL)}


def _model_config_kwargs(backbone: dict | None = None, **overrides: Any) -> dict[str, Any]:
    kwargs = copy.deepcopy(MODEL_BASE_KWARGS)
    kwargs["backbone_config"].update(backbone or {})
    kwargs.update(overrides)
    if "num_labels" in overrides and "id2label" not in overrides:
        kwargs.pop("id2label")
    return kwargs


@pytest.fixture
def model_config_kwargs() -> Callable[..., dict[str, Any]]:
    """Factory: model_config_kwargs(backbone={...}, **mask2former_overrides) -> Mask2FormerConfig kwargs."""
    return _model_config_kwargs


def _randomize_reference(model: torch.nn.Module, generator: torch.Generator) -> None:
    """transformers initialises norms to (1, 0) and Swin bias tables to 0; perturb them so parity tests see
    non-trivial values everywhere."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "relative_position_bias_table" in name or "level_embed" in name:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture
def model_reference_checkpoint(tmp_path: Path) -> Callable[..., tuple[Path, torch.nn.Module]]:
    """Factory: builds transformers' Mask2FormerForUniversalSegmentation (or Mask2FormerModel with base=True) from
    config kwargs with seeded random weights, saves it with save_pretrained, returns (directory, model in eval)."""
    import transformers

    counter = {"n": 0}

    def build(config_kwargs: dict[str, Any], *, seed: int = 0, base: bool = False) -> tuple[Path, torch.nn.Module]:
        torch.manual_seed(seed)
        config = transformers.Mask2FormerConfig(**copy.deepcopy(config_kwargs))
        model_class = transformers.Mask2FormerModel if base else transformers.Mask2FormerForUniversalSegmentation
        model = model_class(config).eval()
        _randomize_reference(model, torch.Generator().manual_seed(seed + 1))
        counter["n"] += 1
        directory = tmp_path / f"reference-{counter['n']}"
        model.save_pretrained(directory)
        return directory, model

    return build


def _padded_batch(sizes: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    pixel_values = torch.zeros(len(sizes), 3, height, width)
    pixel_mask = torch.zeros(len(sizes), height, width, dtype=torch.int64)
    for index, (h, w) in enumerate(sizes):
        pixel_values[index, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        pixel_mask[index, :h, :w] = 1
    return pixel_values, pixel_mask


@pytest.fixture
def model_padded_batch() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Factory: images of the given (H, W) sizes, zero-padded bottom/right into one batch, with the pixel_mask."""
    return _padded_batch


def _assert_close(name: str, expected: Any, actual: Any, tolerance: float) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{name}: expected a tensor, got {type(actual).__name__}"
        assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        difference = (actual.detach().float() - expected.detach().float()).abs().max().item() if expected.numel() else 0
        assert difference <= tolerance, f"{name}: max abs difference {difference:.3g} > {tolerance}"
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), f"{name}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            _assert_close(f"{name}.{key}", expected[key], actual[key], tolerance)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{name}: {len(actual)} entries != {len(expected)}"
        for index, (e, a) in enumerate(zip(expected, actual)):
            _assert_close(f"{name}[{index}]", e, a, tolerance)
    else:
        assert actual == expected, f"{name}: {actual!r} != {expected!r}"


@pytest.fixture
def model_assert_outputs_close() -> Callable[..., None]:
    """assert_outputs_close(reference_output, our_output): same non-None fields, each within the tolerance."""

    def check(expected: Any, actual: Any, tolerance: float = MODEL_PARITY_TOLERANCE) -> None:
        expected_fields = list(expected.keys())
        assert list(actual.keys()) == expected_fields, f"fields {list(actual.keys())} != {expected_fields}"
        for field in expected_fields:
            _assert_close(field, expected[field], actual[field], tolerance)

    return check
