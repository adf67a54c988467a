"""Mask2Former models: `Mask2FormerModel` (backbone + pixel decoder + transformer decoder) and
`Mask2FormerForUniversalSegmentation` (adds the class head and the training loss).

Same module tree, parameter shapes and outputs as transformers 5.24's classes, so checkpoints move both ways
(see `checkpoints.py` for the few renamed Swin parameters). Like transformers, the model ignores `pixel_mask`:
padded pixels are treated as image content, so a padded batch gives (slightly) different logits than the images
one by one.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from . import checkpoints
from .configuration import Mask2FormerConfig
from .outputs import (Mask2FormerForUniversalSegmentationOutput, Mask2FormerMaskedAttentionDecoderOutput,
                      Mask2FormerModelOutput, Mask2FormerPixelDecoderOutput, Mask2FormerPixelLevelModuleOutput)
from .pixel_decoder import Mask2FormerPixelDecoder, MultiscaleDeformableAttention
from .swin import SwinBackbone, init_swin_weights
from .transformer_decoder import (Mask2FormerMaskedAttentionDecoderLayer, Mask2FormerMaskPredictor,
                                  Mask2FormerTransformerModule)

__all__ = [
    "Mask2FormerPreTrainedModel",
    "Mask2FormerPixelLevelModule",
    "Mask2FormerModel",
    "Mask2FormerForUniversalSegmentation",
    "Mask2FormerModelOutput",
    "Mask2FormerForUniversalSegmentationOutput",
    "Mask2FormerPixelLevelModuleOutput",
    "Mask2FormerPixelDecoderOutput",
    "Mask2FormerMaskedAttentionDecoderOutput",
]


class Mask2FormerPreTrainedModel(nn.Module):
    """Shared: config holder, weight initialisation after transformers, from_pretrained / save_pretrained."""

    config_class = Mask2FormerConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        if not isinstance(config, Mask2FormerConfig):
            raise TypeError(f"Expected a Mask2FormerConfig, got {type(config).__name__}.")
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def name_or_path(self) -> str:
        """The checkpoint directory from_pretrained read ("" for a model built from a configuration)."""
        return self.config.name_or_path

    @property
    def base_model(self) -> nn.Module:
        """The backbone-to-decoder `Mask2FormerModel` (the model itself, or its `model` under a task head)."""
        return getattr(self, self.base_model_prefix, self)

    def init_weights(self) -> None:
        """Random initialisation with the distributions transformers uses (values differ, as any seed would).

        Also rebuilds the computed buffers (Swin's relative-position indices, the loss's class weights), so a model
        built on the meta device and materialised with `to_empty()` works after `init_weights()` (then load weights).
        """
        std = self.config.init_std
        gain = self.config.init_xavier_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        # specific rules override the generic ones above, as in transformers' _init_weights
        for module in self.modules():
            if isinstance(module, SwinBackbone):
                init_swin_weights(module, std)
            elif isinstance(module, Mask2FormerTransformerModule):
                for projection in module.input_projections:
                    if isinstance(projection, nn.Conv2d):
                        nn.init.xavier_uniform_(projection.weight, gain=gain)
                        nn.init.zeros_(projection.bias)
            elif isinstance(module, MultiscaleDeformableAttention):
                _init_deformable_attention(module)
            elif isinstance(module, Mask2FormerMaskedAttentionDecoderLayer):
                for parameter in module.parameters():
                    if parameter.dim() > 1:
                        nn.init.xavier_uniform_(parameter, gain=gain)
                nn.init.zeros_(module.cross_attn.in_proj_bias)
            elif isinstance(module, Mask2FormerPixelDecoder):
                nn.init.normal_(module.level_embed, std=1.0)
            elif isinstance(module, Mask2FormerMaskPredictor):
                # the mask MLP keeps PyTorch's default Linear initialisation, as in the original
                for linear in module.modules():
                    if isinstance(linear, nn.Linear):
                        linear.reset_parameters()

    def post_init(self) -> None:
        """transformers' end-of-construction hook: (re)initialises every weight and computed buffer."""
        self.init_weights()

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *,
                        config: Mask2FormerConfig | str | os.PathLike | None = None,
                        dtype: str | torch.dtype | None = None, torch_dtype: str | torch.dtype | None = None,
                        device_map: str | int | torch.device | None = None, device: torch.device | str | None = None,
                        strict: bool = True, ignore_mismatched_sizes: bool = False,
                        output_loading_info: bool = False, **kwargs: Any):
        """Loads a transformers-layout checkpoint directory (config.json + model.safetensors or
        pytorch_model.bin), in eval mode, with transformers' keywords: `dtype` ("auto" by default: config.json's
        dtype, else the weights'; or "float16", torch.bfloat16...), `torch_dtype` (its older name), `device_map`
        (one device or "auto"), `ignore_mismatched_sizes`, `output_loading_info`, configuration overrides such as
        `id2label=...`. Missing, unexpected or mis-shaped weights raise `CheckpointError`; strict=False logs them
        instead."""
        return checkpoints.from_pretrained(cls, pretrained_model_name_or_path, config=config, dtype=dtype,
                                           torch_dtype=torch_dtype, device_map=device_map, device=device,
                                           strict=strict, ignore_mismatched_sizes=ignore_mismatched_sizes,
                                           output_loading_info=output_loading_info, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                        state_dict: dict[str, torch.Tensor] | None = None, push_to_hub: bool = False) -> None:
        """Writes config.json and model.safetensors that transformers' from_pretrained loads."""
        checkpoints.save_pretrained(self, save_directory, is_main_process=is_main_process, state_dict=state_dict,
                                    push_to_hub=push_to_hub)


def _init_deformable_attention(module: MultiscaleDeformableAttention) -> None:
    """Offsets start as rays in n_heads directions, at distances 1..n_points; uniform attention weights."""
    nn.init.zeros_(module.sampling_offsets.weight)
    thetas = torch.arange(module.n_heads, dtype=torch.float32) * (2.0 * math.pi / module.n_heads)
    directions = torch.stack([thetas.cos(), thetas.sin()], -1)
    directions = directions / directions.abs().max(-1, keepdim=True)[0]
    grid = directions.view(module.n_heads, 1, 1, 2).repeat(1, module.n_levels, module.n_points, 1)
    grid = grid * torch.arange(1, module.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
    with torch.no_grad():
        module.sampling_offsets.bias.copy_(grid.reshape(-1))
    nn.init.zeros_(module.attention_weights.weight)
    nn.init.zeros_(module.attention_weights.bias)
    nn.init.xavier_uniform_(module.value_proj.weight)
    nn.init.zeros_(module.value_proj.bias)
    nn.init.xavier_uniform_(module.output_proj.weight)
    nn.init.zeros_(module.output_proj.bias)


class Mask2FormerPixelLevelModule(nn.Module):
    """Swin backbone (`encoder`) and deformable-attention pixel decoder (`decoder`)."""

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        self.encoder = SwinBackbone(config.backbone_config)
        if len(self.encoder.channels) < 4:
            raise ValueError(f"Mask2Former needs four backbone outputs (strides 4..32); backbone_config.out_features "
                             f"is {config.backbone_config.out_features}.")
        self.decoder = Mask2FormerPixelDecoder(config, feature_channels=self.encoder.channels)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False
                ) -> Mask2FormerPixelLevelModuleOutput:
        backbone_features = self.encoder(pixel_values)
        decoded = self.decoder(backbone_features)
        return Mask2FormerPixelLevelModuleOutput(
            encoder_last_hidden_state=backbone_features[-1],
            encoder_hidden_states=tuple(backbone_features) if output_hidden_states else None,
            decoder_last_hidden_state=decoded.mask_features,
            decoder_hidden_states=decoded.multi_scale_features,
        )


class Mask2FormerModel(Mask2FormerPreTrainedModel):
    """Backbone + pixel decoder + masked-attention decoder; returns mask logits of every decoder prediction."""

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__(config)
        self.pixel_level_module = Mask2FormerPixelLevelModule(config)
        self.transformer_module = Mask2FormerTransformerModule(in_features=config.feature_size, config=config)
        self.init_weights()

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None) -> Mask2FormerModelOutput | tuple:
        """pixel_values: (B, 3, H, W). `pixel_mask` is accepted and ignored, exactly as in transformers."""
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict

        pixel_level = self.pixel_level_module(pixel_values, output_hidden_states=output_hidden_states)
        decoded = self.transformer_module(pixel_level.decoder_hidden_states, pixel_level.decoder_last_hidden_state,
                                          output_hidden_states=True, output_attentions=bool(output_attentions))
        output = Mask2FormerModelOutput(
            encoder_last_hidden_state=pixel_level.encoder_last_hidden_state,
            pixel_decoder_last_hidden_state=pixel_level.decoder_last_hidden_state,
            transformer_decoder_last_hidden_state=decoded.last_hidden_state,
            encoder_hidden_states=pixel_level.encoder_hidden_states if output_hidden_states else None,
            pixel_decoder_hidden_states=pixel_level.decoder_hidden_states if output_hidden_states else None,
            transformer_decoder_hidden_states=decoded.hidden_states if output_hidden_states else None,
            transformer_decoder_intermediate_states=(
                decoded.intermediate_hidden_states if output_hidden_states else None),
            masks_queries_logits=decoded.masks_queries_logits,
            attentions=decoded.attentions,
        )
        return output if return_dict else output.to_tuple()

    def _forward_for_head(self, pixel_values: torch.Tensor, output_hidden_states: bool, output_attentions: bool,
                          all_mask_predictions: bool
                          ) -> tuple[Mask2FormerPixelLevelModuleOutput, Mask2FormerMaskedAttentionDecoderOutput]:
        pixel_level = self.pixel_level_module(pixel_values, output_hidden_states=output_hidden_states)
        decoded = self.transformer_module(pixel_level.decoder_hidden_states, pixel_level.decoder_last_hidden_state,
                                          output_hidden_states=output_hidden_states,
                                          output_attentions=output_attentions,
                                          all_mask_predictions=all_mask_predictions)
        return pixel_level, decoded


class Mask2FormerForUniversalSegmentation(Mask2FormerPreTrainedModel):
    """Mask2Former with the class head; feed the output to the image processor's post_process_* methods."""

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__(config)
        from .loss import Mask2FormerLoss

        self.model = Mask2FormerModel(config)
        self.weight_dict: dict[str, float] = {
            "loss_cross_entropy": config.class_weight,
            "loss_mask": config.mask_weight,
            "loss_dice": config.dice_weight,
        }
        self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
        self.criterion = Mask2FormerLoss(config=config, weight_dict=self.weight_dict)
        nn.init.normal_(self.class_predictor.weight, mean=0.0, std=config.init_std)
        nn.init.zeros_(self.class_predictor.bias)

    def init_weights(self) -> None:
        super().init_weights()
        self.criterion.init_buffers()

    def get_loss_dict(self, masks_queries_logits: torch.Tensor, class_queries_logits: torch.Tensor,
                      mask_labels: list[torch.Tensor], class_labels: list[torch.Tensor],
                      auxiliary_predictions: list[dict[str, torch.Tensor]] | None) -> dict[str, torch.Tensor]:
        """Criterion losses, each multiplied by the weight of its kind (aux `loss_mask_3` by mask_weight, ...)."""
        losses = self.criterion(masks_queries_logits=masks_queries_logits, class_queries_logits=class_queries_logits,
                                mask_labels=mask_labels, class_labels=class_labels,
                                auxiliary_predictions=auxiliary_predictions)
        weighted = {}
        for name, value in losses.items():
            for kind, weight in self.weight_dict.items():
                if kind in name:
                    value = value * weight
            weighted[name] = value
        return weighted

    def get_loss(self, loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(loss_dict.values())

    def forward(self, pixel_values: torch.Tensor, mask_labels: list[torch.Tensor] | None = None,
                class_labels: list[torch.Tensor] | None = None, pixel_mask: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, output_auxiliary_logits: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None
                ) -> Mask2FormerForUniversalSegmentationOutput | tuple:
        """pixel_values (B, 3, H, W) -> class logits (B, Q, L + 1) and mask logits (B, Q, H/4, W/4).

        With `mask_labels` (per image (T_i, H, W)) and `class_labels` (per image (T_i,)) also the weighted loss.
        `pixel_mask` is ignored, as in transformers.
        """
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        output_auxiliary_logits = (config.output_auxiliary_logits if output_auxiliary_logits is None
                                   else output_auxiliary_logits)

        computes_loss = mask_labels is not None and class_labels is not None
        # intermediate predictions are only seen through the loss and auxiliary_logits; skip them otherwise
        needs_intermediate = computes_loss or bool(output_auxiliary_logits) or self.training
        pixel_level, decoded = self.model._forward_for_head(pixel_values, bool(output_hidden_states),
                                                            bool(output_attentions), needs_intermediate)
        states = decoded.intermediate_hidden_states if needs_intermediate else decoded.intermediate_hidden_states[-1:]
        class_queries_logits = tuple(self.class_predictor(state.transpose(0, 1)) for state in states)  # (B, Q, L+1)
        masks_queries_logits = decoded.masks_queries_logits
        auxiliary_logits = [{"masks_queries_logits": masks, "class_queries_logits": classes}
                            for masks, classes in zip(masks_queries_logits[:-1], class_queries_logits[:-1])]

        loss = None
        if computes_loss:
            loss_dict = self.get_loss_dict(masks_queries_logits[-1], class_queries_logits[-1], mask_labels,
                                           class_labels, auxiliary_logits)
            loss = self.get_loss(loss_dict)

        output = Mask2FormerForUniversalSegmentationOutput(
            loss=loss,
            class_queries_logits=class_queries_logits[-1],
            masks_queries_logits=masks_queries_logits[-1],
            auxiliary_logits=auxiliary_logits if output_auxiliary_logits else None,
            encoder_last_hidden_state=pixel_level.encoder_last_hidden_state,
            pixel_decoder_last_hidden_state=pixel_level.decoder_last_hidden_state,
            transformer_decoder_last_hidden_state=decoded.last_hidden_state,
            encoder_hidden_states=pixel_level.encoder_hidden_states if output_hidden_states else None,
            pixel_decoder_hidden_states=pixel_level.decoder_hidden_states if output_hidden_states else None,
            transformer_decoder_hidden_states=decoded.hidden_states if output_hidden_states else None,
            attentions=decoded.attentions,
        )
        return output if return_dict else output.to_tuple()
