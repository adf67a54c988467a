"""Output records of the Mask2Former modules, with the fields (names and order) of transformers' outputs, and the
attribute dict `BatchFeature` that the image processor returns.

Like transformers' `ModelOutput`: attribute access, `out["name"]` and `to_tuple()` both see only the fields that are
not None, in declaration order; `out[0]` indexes that tuple.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch

__all__ = [
    "BatchFeature",
    "ModelOutput",
    "Mask2FormerPixelDecoderOutput",
    "Mask2FormerMaskedAttentionDecoderOutput",
    "Mask2FormerPixelLevelModuleOutput",
    "Mask2FormerModelOutput",
    "Mask2FormerForUniversalSegmentationOutput",
]


class BatchFeature(dict):
    """A dict with attribute access and `.to()`: the processor's output (so `model(**inputs)` works) and the semantic
    post-processor's per-image `segmentation` / `segmentation_scores` (transformers' BatchFeature and its subclass)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error

    def to(self, *args: Any, **kwargs: Any) -> "BatchFeature":
        """Moves every tensor (also inside the mask_labels/class_labels lists) like `Tensor.to`."""
        def move(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                # pixel_mask and labels keep their integer dtype when a float dtype is requested.
                if value.is_floating_point() or not any(isinstance(a, torch.dtype) for a in args):
                    return value.to(*args, **kwargs)
                return value.to(*[a for a in args if not isinstance(a, torch.dtype)],
                                **{k: v for k, v in kwargs.items() if k != "dtype"})
            if isinstance(value, list):
                return [move(v) for v in value]
            return value
        return BatchFeature({key: move(value) for key, value in self.items()})


@dataclass
class ModelOutput:
    def items(self) -> Iterator[tuple[str, Any]]:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                yield field.name, value

    def keys(self) -> list[str]:
        return [name for name, _ in self.items()]

    def values(self) -> list[Any]:
        return [value for _, value in self.items()]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            present = dict(self.items())
            if key not in present:
                raise KeyError(f"{type(self).__name__} has no (non-None) field {key!r}; present: {list(present)}")
            return present[key]
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


@dataclass
class Mask2FormerPixelDecoderOutput(ModelOutput):
    """multi_scale_features: 3 maps (B, C, H/32..H/8, ...), lowest resolution first; mask_features: (B, C, H/4, W/4)."""

    multi_scale_features: tuple[torch.Tensor, ...] | None = None
    mask_features: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class Mask2FormerMaskedAttentionDecoderOutput(ModelOutput):
    """last_hidden_state: (B, Q, C); hidden_states: per layer input plus final output, each (Q, B, C);
    intermediate_hidden_states: layer-normed states (Q, B, C), one per prediction; masks_queries_logits: one
    (B, Q, H/4, W/4) per prediction; attentions: self-attention weights (B, heads, Q, Q) per layer."""

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    masks_queries_logits: tuple[torch.Tensor, ...] | None = None
    intermediate_hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class Mask2FormerPixelLevelModuleOutput(ModelOutput):
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_last_hidden_state: torch.Tensor | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class Mask2FormerModelOutput(ModelOutput):
    encoder_last_hidden_state: torch.Tensor | None = None
    pixel_decoder_last_hidden_state: torch.Tensor | None = None
    transformer_decoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    pixel_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    transformer_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    transformer_decoder_intermediate_states: tuple[torch.Tensor, ...] | None = None
    masks_queries_logits: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class Mask2FormerForUniversalSegmentationOutput(ModelOutput):
    """class_queries_logits: (B, Q, L + 1); masks_queries_logits: (B, Q, H/4, W/4); auxiliary_logits: one dict per
    intermediate prediction (all but the last) with the same two keys."""

    loss: torch.Tensor | None = None
    class_queries_logits: torch.Tensor | None = None
    masks_queries_logits: torch.Tensor | None = None
    auxiliary_logits: list[dict[str, torch.Tensor]] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    pixel_decoder_last_hidden_state: torch.Tensor | None = None
    transformer_decoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    pixel_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    transformer_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
