"""Mask2Former pixel decoder: a multi-scale deformable-attention encoder over the 1/32, 1/16, 1/8 backbone maps,
then an FPN step up to 1/4 resolution and the 1x1 mask projection. Pure PyTorch (`grid_sample`), as transformers.

Speed: the deformable sampling of all levels is one `embedding_bag` (a weighted gather) instead of one
`grid_sample` per level and a weighted sum over a materialised (B*heads, d, Q, L*P) tensor.

Parity notes: position embeddings are sine embeddings computed without any padding mask (transformers ignores
`pixel_mask`), the level embedding is added to the position embedding, reference points sit at pixel centres,
sampling offsets are normalised by each level's (W, H), and the FPN upsampling is bilinear (align_corners=False).
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import Mask2FormerConfig
from .outputs import Mask2FormerPixelDecoderOutput
from .swin import shape_cached

__all__ = [
    "Mask2FormerSinePositionEmbedding",
    "MultiscaleDeformableAttention",
    "Mask2FormerPixelDecoderEncoderLayer",
    "Mask2FormerPixelDecoderEncoderOnly",
    "Mask2FormerPixelDecoder",
    "multi_scale_deformable_attention",
    "LevelGeometry",
]

NUM_FEATURE_LEVELS = 3
NUM_SAMPLING_POINTS = 4


class Mask2FormerSinePositionEmbedding(nn.Module):
    """DETR's 2-D sine embedding over the whole map (no padding mask): (B, 2 * num_position_features, H, W).

    The embedding depends only on the shape, so it is built once per (H, W, device, dtype) and reused.
    """

    def __init__(self, num_position_features: int, temperature: int = 10000, normalize: bool = True,
                 scale: float | None = None) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("A position-embedding scale needs normalize=True.")
        self.num_position_features = num_position_features
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self._cache: dict[tuple, torch.Tensor] = {}

    def embedding(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(2 * num_position_features, H, W), y features first then x, sin/cos interleaved."""
        return shape_cached(self._cache, (height, width, device, dtype),
                            lambda: self._build_embedding(height, width, device, dtype))

    def _build_embedding(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        y_embed = torch.arange(1, height + 1, dtype=dtype, device=device)[:, None].expand(height, width)
        x_embed = torch.arange(1, width + 1, dtype=dtype, device=device)[None, :].expand(height, width)
        if self.normalize:
            y_embed = y_embed / (y_embed[-1:, :] + 1e-6) * self.scale
            x_embed = x_embed / (x_embed[:, -1:] + 1e-6) * self.scale
        dim_t = torch.arange(self.num_position_features, dtype=torch.int64, device=device).to(dtype)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_position_features)
        pos_x = x_embed[:, :, None] / dim_t
        pos_y = y_embed[:, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, 0::2].sin(), pos_x[:, :, 1::2].cos()), dim=3).flatten(2)
        pos_y = torch.stack((pos_y[:, :, 0::2].sin(), pos_y[:, :, 1::2].cos()), dim=3).flatten(2)
        return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).contiguous()

    def forward(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        batch, _, height, width = shape
        return self.embedding(height, width, device, dtype).unsqueeze(0).expand(batch, -1, -1, -1)


# Zero border around each level in the sampling table: 1 before, 2 after, so that after clamping a sample to
# [-1, size] all four bilinear neighbours are inside the padded level and outside pixels read zeros.
_BORDER_BEFORE, _BORDER_AFTER = 1, 2


class LevelGeometry:
    """Sampling geometry of one set of level shapes (built once per shapes/device/dtype).

    reference_pixels: (S, 1, L, 1, 2), the reference point of every token (its own pixel centre, normalised to
    [0, 1] as in transformers) in each level's pixel coordinates, where pixel centres sit at integers.
    The other tensors describe the zero-bordered table the samples read from, per level shaped (L, 1):
    max_x / max_y (clamp bounds W and H), row_starts (first row of the level in the bordered table, already
    offset by the border) and padded_widths; corner_steps (L, 1, 4) are the row steps to the four neighbours
    in units of table rows per token (multiplied by the number of heads at use).
    """

    def __init__(self, spatial_shapes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype) -> None:
        def level_column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1)

        border = _BORDER_BEFORE + _BORDER_AFTER
        self.spatial_shapes = list(spatial_shapes)
        self._tables: dict[tuple, torch.Tensor] = {}
        self.padded_shapes = [(h + border, w + border) for h, w in spatial_shapes]
        self.max_x = level_column([w for _, w in spatial_shapes])
        self.max_y = level_column([h for h, _ in spatial_shapes])
        padded_widths = [w for _, w in self.padded_shapes]
        starts = [0]
        for height, width in self.padded_shapes[:-1]:
            starts.append(starts[-1] + height * width)
        self.padded_tokens = sum(h * w for h, w in self.padded_shapes)
        # table index of pixel (x0, y0) = row_start + y0 * padded_width + x0, border included
        self.row_starts = level_column([start + _BORDER_BEFORE * (width + 1)
                                        for start, width in zip(starts, padded_widths)])
        self.padded_widths = level_column(padded_widths)
        self.corner_steps = torch.tensor([[0, 1, width, width + 1] for width in padded_widths],
                                         dtype=torch.long, device=device).view(-1, 1, 4)
        references = []
        for height, width in spatial_shapes:
            ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, height - 0.5, height, dtype=dtype, device=device),
                                          torch.linspace(0.5, width - 0.5, width, dtype=dtype, device=device),
                                          indexing="ij")
            references.append(torch.stack((ref_x.reshape(-1) / width, ref_y.reshape(-1) / height), -1))
        reference = torch.cat(references, 0)  # (S, 2)
        level_sizes = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=dtype, device=device)  # (L, 2)
        # grid_sample (align_corners=False) reads normalised position u at pixel u * size - 0.5
        self.reference_pixels = (reference[:, None, :] * level_sizes - 0.5)[:, None, :, None, :]

    def bordered_table(self, value: torch.Tensor) -> torch.Tensor:
        """value (B, S, heads, d) -> (B * S_padded * heads, d): every level framed by zeros.

        Without autograd the zero-framed buffer is reused between layers and calls of the same thread (only the
        interiors are written); not under torch.compile, which plans its own buffers (and cannot trace the thread
        id).
        """
        batch, _, heads, head_dim = value.shape
        channels = heads * head_dim
        reusable = not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and value.requires_grad)
        table = None
        if reusable:
            key = (batch, channels, value.dtype, value.device, threading.get_ident(),
                   torch.is_inference_mode_enabled())
            table = self._tables.get(key)
        if table is None:
            table = value.new_zeros(batch, self.padded_tokens, channels)
            if reusable:
                self._tables = {key: table}
        start = 0
        levels = value.split([h * w for h, w in self.spatial_shapes], 1)
        for level, (height, width), (padded_height, padded_width) in zip(levels, self.spatial_shapes,
                                                                         self.padded_shapes):
            frame = table[:, start:start + padded_height * padded_width].view(batch, padded_height, padded_width,
                                                                              channels)
            frame[:, _BORDER_BEFORE:_BORDER_BEFORE + height, _BORDER_BEFORE:_BORDER_BEFORE + width] = \
                level.reshape(batch, height, width, channels)
            start += padded_height * padded_width
        return table.view(-1, head_dim)


def multi_scale_deformable_attention(value: torch.Tensor, geometry: LevelGeometry, sampling_pixels: torch.Tensor,
                                     attention_weights: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling of every level at the given points, weighted by attention and summed.

    Same result as transformers' `grid_sample` formulation (bilinear, zero padding, align_corners=False), computed
    as ONE weighted gather over all levels: each sample contributes its four neighbouring pixels with weight
    attention x bilinear weight, read from a copy of `value` with a zero border around each level (a sample
    outside a level is clamped onto the border, where it reads zeros), and `embedding_bag` sums them without
    materialising the sampled values.

    value: (B, S, heads, d), levels concatenated; sampling_pixels: (B, Q, heads, L, P, 2) as (x, y) in pixels of
    each level; attention_weights: (B, Q, heads, L, P). Returns (B, Q, heads * d).
    """
    batch, _, heads, head_dim = value.shape
    queries = sampling_pixels.shape[1]
    # indices must be exact: work in float32 whatever the model dtype
    pixels = sampling_pixels.float().nan_to_num(nan=-1.0)  # a NaN offset must not become a wild index
    x = pixels[..., 0].clamp(min=-1).minimum(geometry.max_x)  # (B, Q, heads, L, P)
    y = pixels[..., 1].clamp(min=-1).minimum(geometry.max_y)
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    table = geometry.bordered_table(value)
    index_dtype = torch.int32 if table.shape[0] < 2 ** 31 else torch.int64
    token = (geometry.row_starts + y0 * geometry.padded_widths + x0).to(index_dtype)  # top-left neighbour
    batch_head = (torch.arange(batch, device=value.device, dtype=index_dtype).view(batch, 1, 1, 1, 1)
                  * (geometry.padded_tokens * heads)
                  + torch.arange(heads, device=value.device, dtype=index_dtype).view(1, 1, heads, 1, 1))
    corner_steps = (geometry.corner_steps * heads).to(index_dtype)  # (L, 1, 4)
    rows = (token * heads + batch_head).unsqueeze(-1) + corner_steps  # (B, Q, heads, L, P, 4)
    # bilinear weights of neighbours (x0, y0), (x0+1, y0), (x0, y0+1), (x0+1, y0+1), times the attention weight
    attention = attention_weights.float()
    weight_x = torch.stack((attention - attention * fx, attention * fx), -1)
    weight_y = torch.stack((1 - fy, fy), -1)
    weights = (weight_y.unsqueeze(-1) * weight_x.unsqueeze(-2)).flatten(-2)
    samples_per_query = rows.shape[3] * rows.shape[4] * rows.shape[5]
    output = F.embedding_bag(rows.view(-1, samples_per_query), table, mode="sum",
                             per_sample_weights=weights.view(-1, samples_per_query).to(value.dtype))
    return output.view(batch, queries, heads * head_dim)


class MultiscaleDeformableAttention(nn.Module):
    """Deformable DETR attention: each query samples `n_points` locations per level around its reference point."""

    def __init__(self, embed_dim: int, num_heads: int, n_levels: int, n_points: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"feature_size {embed_dim} must be divisible by num_attention_heads {num_heads}.")
        self.d_model = embed_dim
        self.n_heads = num_heads
        self.n_levels = n_levels
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * n_levels * n_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: torch.Tensor, geometry: LevelGeometry
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states, position_embeddings: (B, S, C) -> (output (B, S, C), attention weights (B, S, h, L, P))."""
        batch, tokens, _ = hidden_states.shape
        query = hidden_states + position_embeddings
        value = self.value_proj(hidden_states).view(batch, tokens, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(batch, tokens, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(batch, tokens, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(batch, tokens, self.n_heads, self.n_levels, self.n_points)
        # offsets are in pixels of each level (transformers divides by (W, H), grid_sample multiplies back)
        sampling_pixels = geometry.reference_pixels + offsets
        output = multi_scale_deformable_attention(value, geometry, sampling_pixels, weights)
        return self.output_proj(output), weights


class Mask2FormerPixelDecoderEncoderLayer(nn.Module):
    """Post-norm encoder layer: LN(x + deformable_attn(x)), then LN(x + FFN(x))."""

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        dim = config.feature_size
        self.self_attn = MultiscaleDeformableAttention(dim, config.num_attention_heads, NUM_FEATURE_LEVELS,
                                                       NUM_SAMPLING_POINTS)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.encoder_feedforward_dim)
        self.fc2 = nn.Linear(config.encoder_feedforward_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = config.dropout

    def forward(self, hidden_states: torch.Tensor, position_embeddings: torch.Tensor, geometry: LevelGeometry
                ) -> tuple[torch.Tensor, torch.Tensor]:
        attended, weights = self.self_attn(hidden_states, position_embeddings, geometry)
        attended = F.dropout(attended, p=self.dropout, training=self.training)
        hidden_states = self.self_attn_layer_norm(hidden_states + attended)
        feed_forward = F.dropout(F.relu(self.fc1(hidden_states)), p=self.dropout, training=self.training)
        feed_forward = F.dropout(self.fc2(feed_forward), p=self.dropout, training=self.training)
        hidden_states = self.final_layer_norm(hidden_states + feed_forward)
        if self.training:
            # as transformers: clamp everything once anything overflowed; chosen on the device (no host sync)
            clamp = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.where(torch.isfinite(hidden_states).all(), hidden_states,
                                        hidden_states.clamp(min=-clamp, max=clamp))
        return hidden_states, weights


class Mask2FormerPixelDecoderEncoderOnly(nn.Module):
    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Mask2FormerPixelDecoderEncoderLayer(config)
                                     for _ in range(config.encoder_layers)])
        self._geometry_cache: dict[tuple, LevelGeometry] = {}

    def geometry(self, spatial_shapes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype
                 ) -> LevelGeometry:
        return shape_cached(self._geometry_cache, (tuple(spatial_shapes), device, dtype),
                            lambda: LevelGeometry(spatial_shapes, device, dtype))

    def forward(self, inputs_embeds: torch.Tensor, position_embeddings: torch.Tensor,
                spatial_shapes: list[tuple[int, int]], output_attentions: bool = False
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        geometry = self.geometry(spatial_shapes, inputs_embeds.device, inputs_embeds.dtype)
        hidden_states = inputs_embeds
        attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, position_embeddings, geometry)
            if output_attentions:
                attentions += (weights.transpose(1, 0),)
        return hidden_states, attentions


class Mask2FormerPixelDecoder(nn.Module):
    def __init__(self, config: Mask2FormerConfig, feature_channels: list[int]) -> None:
        super().__init__()
        feature_dim = config.feature_size
        self.feature_channels = list(feature_channels)
        transformer_in_channels = self.feature_channels[-NUM_FEATURE_LEVELS:]
        self.position_embedding = Mask2FormerSinePositionEmbedding(feature_dim // 2, normalize=True)
        self.level_embed = nn.Parameter(torch.zeros(NUM_FEATURE_LEVELS, feature_dim))
        # index 0 projects the lowest-resolution map (stage4)
        self.input_projections = nn.ModuleList([
            nn.Sequential(nn.Conv2d(channels, feature_dim, kernel_size=1), nn.GroupNorm(32, feature_dim))
            for channels in transformer_in_channels[::-1]
        ])
        self.encoder = Mask2FormerPixelDecoderEncoderOnly(config)
        self.mask_projection = nn.Conv2d(feature_dim, config.mask_feature_size, kernel_size=1)

        transformer_stride = min(config.feature_strides[-NUM_FEATURE_LEVELS:])
        self.num_fpn_levels = int(math.log2(transformer_stride) - math.log2(config.common_stride))
        for index, channels in enumerate(self.feature_channels[:self.num_fpn_levels]):
            self.add_module(f"adapter_{index + 1}", nn.Sequential(
                nn.Conv2d(channels, feature_dim, kernel_size=1, bias=False), nn.GroupNorm(32, feature_dim)))
            self.add_module(f"layer_{index + 1}", nn.Sequential(
                nn.Conv2d(feature_dim, feature_dim, kernel_size=3, padding=1, bias=False),
                nn.GroupNorm(32, feature_dim), nn.ReLU()))

    def forward(self, features: tuple[torch.Tensor, ...], output_attentions: bool = False
                ) -> Mask2FormerPixelDecoderOutput:
        """features: backbone maps, highest resolution first (1/4, 1/8, 1/16, 1/32)."""
        transformer_features = features[::-1][:NUM_FEATURE_LEVELS]  # 1/32, 1/16, 1/8
        spatial_shapes = [(x.shape[2], x.shape[3]) for x in transformer_features]
        batch = features[0].shape[0]
        flat_inputs, flat_positions = [], []
        for level, x in enumerate(transformer_features):
            projected = self.input_projections[level](x)
            flat_inputs.append(projected.flatten(2).transpose(1, 2))  # (B, H_l*W_l, C)
            position = self.position_embedding.embedding(x.shape[2], x.shape[3], x.device, projected.dtype)
            flat_positions.append(position.flatten(1).transpose(0, 1) + self.level_embed[level])  # (H_l*W_l, C)
        inputs_embeds = torch.cat(flat_inputs, 1)  # (B, S, C)
        position_embeddings = torch.cat(flat_positions, 0).unsqueeze(0)  # (1, S, C)

        encoded, attentions = self.encoder(inputs_embeds, position_embeddings, spatial_shapes, output_attentions)

        # contiguous NCHW maps: a channels-last view here would make every later conv and resize at 1/4
        # resolution convert its (much larger) input
        outputs = [level.transpose(1, 2).reshape(batch, -1, height, width).contiguous()
                   for level, (height, width) in zip(encoded.split([h * w for h, w in spatial_shapes], 1),
                                                     spatial_shapes)]
        for index in range(self.num_fpn_levels - 1, -1, -1):
            lateral = getattr(self, f"adapter_{index + 1}")(features[index])
            upsampled = F.interpolate(outputs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outputs.append(getattr(self, f"layer_{index + 1}")(lateral + upsampled))

        return Mask2FormerPixelDecoderOutput(
            multi_scale_features=tuple(outputs[:NUM_FEATURE_LEVELS]),
            mask_features=self.mask_projection(outputs[-1]),
            attentions=attentions,
        )
