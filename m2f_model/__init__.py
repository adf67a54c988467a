"""Mask2Former (panoptic, instance and semantic segmentation) in plain PyTorch, with transformers' API.

A user switching from transformers changes only the import:
`from m2f_model import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor`.
"""
from .checkpoints import CheckpointError
from .configuration import Mask2FormerConfig, SwinConfig
from .image_processing import Mask2FormerImageProcessor
from .loss import Mask2FormerHungarianMatcher, Mask2FormerLoss
from .modeling import (Mask2FormerForUniversalSegmentation, Mask2FormerModel, Mask2FormerPreTrainedModel)
from .outputs import (Mask2FormerForUniversalSegmentationOutput, Mask2FormerMaskedAttentionDecoderOutput,
                      Mask2FormerModelOutput, Mask2FormerPixelDecoderOutput, Mask2FormerPixelLevelModuleOutput)

__all__ = [
    "CheckpointError",
    "Mask2FormerConfig",
    "SwinConfig",
    "Mask2FormerImageProcessor",
    "Mask2FormerHungarianMatcher",
    "Mask2FormerLoss",
    "Mask2FormerPreTrainedModel",
    "Mask2FormerModel",
    "Mask2FormerForUniversalSegmentation",
    "Mask2FormerModelOutput",
    "Mask2FormerForUniversalSegmentationOutput",
    "Mask2FormerPixelLevelModuleOutput",
    "Mask2FormerPixelDecoderOutput",
    "Mask2FormerMaskedAttentionDecoderOutput",
]
