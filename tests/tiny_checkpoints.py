"""Tiny random-weight Mask2Former configurations and checkpoints, shared by every test package.

A module of its own (not conftest.py) so tests can import it by a name no other file shares.
"""
from __future__ import annotations

import copy
from pathlib import Path

# A tiny Swin-backed Mask2Former: GroupNorm(32, .) needs feature sizes that are multiples of 32.
TINY_CONFIG_KWARGS: dict = {
    "backbone_config": {
        "model_type": "swin",
        "image_size": 64,
        "patch_size": 4,
        "embed_dim": 16,
        "depths": [1, 1, 2, 1],
        "num_heads": [1, 2, 2, 4],
        "window_size": 4,
        "drop_path_rate": 0.0,
        "out_features": ["stage1", "stage2", "stage3", "stage4"],
    },
    "feature_size": 32,
    "mask_feature_size": 32,
    "hidden_dim": 32,
    "encoder_feedforward_dim": 64,
    "dim_feedforward": 64,
    "encoder_layers": 2,
    "decoder_layers": 3,
    "num_attention_heads": 2,
    "num_queries": 8,
    "num_labels": 5,
    "train_num_points": 64,
}

TINY_ID2LABEL = {0: "circle", 1: "square", 2: "triangle", 3: "sky", 4: "ground"}


def tiny_config_kwargs(**overrides) -> dict:
    """A fresh copy of the tiny configuration, with overrides applied on top."""
    kwargs = copy.deepcopy(TINY_CONFIG_KWARGS)
    kwargs["id2label"] = dict(TINY_ID2LABEL)
    kwargs["label2id"] = {v: k for k, v in TINY_ID2LABEL.items()}
    kwargs.update(overrides)
    return kwargs


def save_tiny_checkpoint(directory: Path, *, seed: int = 0, image_size: int = 64, **overrides) -> Path:
    """Writes a random-weight m2f checkpoint (config.json, model.safetensors, preprocessor_config.json)."""
    import torch

    from m2f_model import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                           Mask2FormerImageProcessor)

    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(**tiny_config_kwargs(**overrides))).eval()
    model.save_pretrained(directory)
    processor = Mask2FormerImageProcessor(size={"height": image_size, "width": image_size}, num_labels=5,
                                          ignore_index=255)
    processor.save_pretrained(directory)
    return Path(directory)
