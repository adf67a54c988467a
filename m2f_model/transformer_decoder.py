"""Mask2Former's masked-attention transformer decoder and its mask predictor.

Each layer: masked cross-attention to one pixel-decoder level (round robin 1/32, 1/16, 1/8), self-attention among
the queries, FFN (post-norm by default, pre-norm with `config.pre_norm`). The cross-attention of a layer may only see
pixels where the previous prediction's mask, resized to that level, has sigmoid >= 0.5; a query whose mask is empty
there sees every pixel. There is one prediction from the initial queries and one after each of the
`decoder_layers - 1` layers.

We keep tensors batch-first (B, Q, C) and hand out transformers' sequence-first (Q, B, C) views only in the
returned hidden states. The attention arithmetic deliberately repeats transformers' operations in the same order
(not `scaled_dot_product_attention`): each layer's output is thresholded into the next attention mask, and with
100 queries over thousands of pixels, last-bit differences flip some pixels and change the outputs visibly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import Mask2FormerConfig
from .outputs import Mask2FormerMaskedAttentionDecoderOutput
from .pixel_decoder import NUM_FEATURE_LEVELS, Mask2FormerSinePositionEmbedding

__all__ = [
    "Mask2FormerAttention",
    "Mask2FormerMaskedAttentionDecoderLayer",
    "Mask2FormerMaskPredictor",
    "Mask2FormerMaskedAttentionDecoder",
    "Mask2FormerTransformerModule",
]


def _activation(name: str):
    activations = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu,
                   "gelu_new": lambda x: F.gelu(x, approximate="tanh")}
    if name not in activations:
        raise ValueError(f"Unsupported activation_function {name!r}; choose one of {sorted(activations)}.")
    return activations[name]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)"""
    batch, tokens, channels = x.shape
    return x.view(batch, tokens, heads, channels // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


class Mask2FormerAttention(nn.Module):
    """DETR-style self-attention: position embeddings are added to queries and keys, not to values."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"hidden_dim {embed_dim} must be divisible by num_attention_heads {num_heads}.")
        self.num_heads = num_heads
        self.dropout = dropout
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: torch.Tensor, need_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states, position_embeddings: (B, Q, C) -> (B, Q, C), weights (B, heads, Q, Q) or None.

        The same operations in the same order as transformers (scaled query, bmm, softmax, bmm): the queries feed
        thresholded attention masks, where even last-bit differences can flip a pixel.
        """
        batch, num_queries, channels = hidden_states.shape
        head_dim = channels // self.num_heads
        with_position = hidden_states + position_embeddings
        query = _split_heads(self.q_proj(with_position) * head_dim ** -0.5, self.num_heads)
        key = _split_heads(self.k_proj(with_position), self.num_heads)
        value = _split_heads(self.v_proj(hidden_states), self.num_heads)
        flat = (batch * self.num_heads, num_queries, head_dim)
        weights = torch.bmm(query.reshape(flat), key.reshape(flat).transpose(1, 2)).softmax(-1)
        returned_weights = None
        if need_weights:
            # the returned weights are a view the context is then computed from, so they are on the loss's path
            returned_weights = weights.view(batch, self.num_heads, num_queries, num_queries)
            weights = returned_weights.view(batch * self.num_heads, num_queries, num_queries)
        context = torch.bmm(F.dropout(weights, p=self.dropout, training=self.training), value.reshape(flat))
        context = context.view(batch, self.num_heads, num_queries, head_dim)
        output = self.out_proj(_merge_heads(context))
        return output, returned_weights


def _sequence_first(batch_first: torch.Tensor, keeps_path: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Q, C) -> the (Q, B, C) view handed out and the (B, Q, C) tensor computation continues from.

    With keeps_path the computation continues from a view of the handed-out tensor, so that tensor is on the loss's
    path and `retain_grad()` on it sees the gradient (as transformers, which computes sequence-first). Views only:
    no copies and the same arithmetic either way.
    """
    sequence_first = batch_first.transpose(0, 1)
    return sequence_first, sequence_first.transpose(0, 1) if keeps_path else batch_first


class Mask2FormerMaskedAttentionDecoderLayer(nn.Module):
    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        dim = config.hidden_dim
        self.pre_norm = config.pre_norm
        self.num_heads = config.num_attention_heads
        self.dropout = config.dropout
        self.self_attn = Mask2FormerAttention(dim, config.num_attention_heads, dropout=config.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, config.num_attention_heads, config.dropout)
        self.cross_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.dim_feedforward)
        self.fc2 = nn.Linear(config.dim_feedforward, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation_fn = _activation(config.activation_function)

    def _masked_cross_attention(self, queries: torch.Tensor, query_positions: torch.Tensor, memory: torch.Tensor,
                                memory_positions: torch.Tensor, allowed: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, Q, C); memory (B, HW, C); allowed (B, 1, Q, HW) bool -> (B, Q, C), head-averaged weights.

        Runs torch's nn.MultiheadAttention exactly as transformers calls it (sequence-first, boolean mask per
        head, weights requested), so the result is the same to the last bit: the next attention mask is a
        threshold of what comes out here.
        """
        batch, num_queries, _ = queries.shape
        blocked = ~allowed.expand(batch, self.num_heads, num_queries, -1).reshape(batch * self.num_heads,
                                                                                   num_queries, -1)
        output, weights = self.cross_attn(query=(queries + query_positions).transpose(0, 1),
                                          key=(memory + memory_positions).transpose(0, 1),
                                          value=memory.transpose(0, 1), attn_mask=blocked, key_padding_mask=None)
        return output.transpose(0, 1), weights

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, p=self.dropout, training=self.training)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._dropout(self.fc2(self._dropout(self.activation_fn(self.fc1(x)))))

    def forward(self, hidden_states: torch.Tensor, query_positions: torch.Tensor, memory: torch.Tensor,
                memory_positions: torch.Tensor, allowed: torch.Tensor, output_attentions: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns (hidden_states (B, Q, C), self-attention weights, cross-attention weights)."""
        if self.pre_norm:
            cross, cross_weights = self._masked_cross_attention(self.cross_attn_layer_norm(hidden_states),
                                                                query_positions, memory, memory_positions, allowed)
            hidden_states = hidden_states + self._dropout(cross)
            attended, self_weights = self.self_attn(self.self_attn_layer_norm(hidden_states), query_positions,
                                                    output_attentions)
            hidden_states = hidden_states + self._dropout(attended)
            hidden_states = hidden_states + self._feed_forward(self.final_layer_norm(hidden_states))
        else:
            cross, cross_weights = self._masked_cross_attention(hidden_states, query_positions, memory,
                                                                memory_positions, allowed)
            hidden_states = self.cross_attn_layer_norm(hidden_states + self._dropout(cross))
            attended, self_weights = self.self_attn(hidden_states, query_positions, output_attentions)
            hidden_states = self.self_attn_layer_norm(hidden_states + self._dropout(attended))
            hidden_states = self.final_layer_norm(hidden_states + self._feed_forward(hidden_states))
        return hidden_states, self_weights, cross_weights


class Mask2FormerMaskPredictor(nn.Module):
    """Mask logits from query embeddings (3-layer MLP dotted with the 1/4 mask features) and the next layer's
    attention mask."""

    def __init__(self, hidden_size: int, num_heads: int, mask_feature_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        # names as transformers: mask_embedder.{i}.0 is the Linear of block i, .1 its activation
        self.mask_embedder = nn.Sequential(
            nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU()),
            nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU()),
            nn.Sequential(nn.Linear(hidden_size, mask_feature_size), nn.Identity()),
        )

    def forward(self, queries: torch.Tensor, pixel_embeddings: torch.Tensor,
                attention_mask_size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """queries (B, Q, C); pixel_embeddings (B, C', H/4, W/4) -> mask logits (B, Q, H/4, W/4) and, if a size is
        given, `allowed` (B, 1, Q, h*w): True where the next layer's cross-attention may look.

        The attention mask is thresholded from the full-resolution logits resized to the level, exactly as in
        transformers (resizing the features first would be cheaper and equal in exact arithmetic, but its
        rounding flips logits that sit at the threshold, and a flip changes the outputs visibly).
        """
        batch, channels, height, width = pixel_embeddings.shape
        mask_embeddings = self.mask_embedder(queries)  # (B, Q, C')
        mask_logits = torch.bmm(mask_embeddings, pixel_embeddings.reshape(batch, channels, height * width))
        mask_logits = mask_logits.view(batch, -1, height, width)
        if attention_mask_size is None:
            return mask_logits, None
        resized = F.interpolate(mask_logits, size=attention_mask_size, mode="bilinear", align_corners=False)
        allowed = (resized.sigmoid().flatten(2) >= 0.5).unsqueeze(1).detach()
        return mask_logits, allowed


class Mask2FormerMaskedAttentionDecoder(nn.Module):
    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        self.layerdrop = config.dropout
        self.layers = nn.ModuleList([Mask2FormerMaskedAttentionDecoderLayer(config)
                                     for _ in range(config.decoder_layers - 1)])
        self.layernorm = nn.LayerNorm(config.hidden_dim)
        self.mask_predictor = Mask2FormerMaskPredictor(config.hidden_dim, config.num_attention_heads,
                                                       config.mask_feature_size)

    def forward(self, queries: torch.Tensor, query_positions: torch.Tensor, memories: list[torch.Tensor],
                memory_positions: list[torch.Tensor], pixel_embeddings: torch.Tensor,
                level_sizes: list[tuple[int, int]], output_hidden_states: bool = False,
                output_attentions: bool = False, all_mask_predictions: bool = True
                ) -> Mask2FormerMaskedAttentionDecoderOutput:
        """queries, query_positions: (B, Q, C); memories/memory_positions: per level (B, h*w, C).

        With all_mask_predictions=False, masks_queries_logits holds only the final prediction (the others are
        still computed: the attention masks come from them).
        """
        all_hidden_states = () if output_hidden_states else None
        attentions = () if output_attentions else None
        num_layers = len(self.layers)
        returned_state, hidden_states = _sequence_first(queries, output_hidden_states)
        returned_normed, normed = _sequence_first(self.layernorm(hidden_states), output_hidden_states)
        intermediate = (returned_normed,)
        mask_logits, allowed = self.mask_predictor(normed, pixel_embeddings, level_sizes[0])
        mask_predictions = (mask_logits,) if all_mask_predictions or num_layers == 0 else ()
        for index, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (returned_state,)
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            level = index % NUM_FEATURE_LEVELS
            # a query whose mask covers nothing at this level attends everywhere instead of nowhere
            allowed = allowed | ~allowed.any(-1, keepdim=True)
            hidden_states, self_weights, _ = layer(hidden_states, query_positions, memories[level],
                                                   memory_positions[level], allowed, output_attentions)
            returned_state, hidden_states = _sequence_first(hidden_states, output_hidden_states)
            returned_normed, normed = _sequence_first(self.layernorm(hidden_states), output_hidden_states)
            is_last = index + 1 == num_layers
            # the attention mask is only needed if another layer follows
            mask_logits, allowed = self.mask_predictor(
                normed, pixel_embeddings, None if is_last else level_sizes[(index + 1) % NUM_FEATURE_LEVELS])
            if all_mask_predictions or is_last:
                mask_predictions += (mask_logits,)
            intermediate += (returned_normed,)
            if output_attentions:
                attentions += (self_weights,)
        if output_hidden_states:
            all_hidden_states += (returned_state,)
        return Mask2FormerMaskedAttentionDecoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=attentions,
            masks_queries_logits=mask_predictions,
            intermediate_hidden_states=intermediate,
        )


class Mask2FormerTransformerModule(nn.Module):
    """Learned queries, per-level memories (projected pixel-decoder maps + level embedding) and the decoder."""

    def __init__(self, in_features: int, config: Mask2FormerConfig) -> None:
        super().__init__()
        hidden_dim = config.hidden_dim
        self.position_embedder = Mask2FormerSinePositionEmbedding(hidden_dim // 2, normalize=True)
        self.queries_embedder = nn.Embedding(config.num_queries, hidden_dim)
        self.queries_features = nn.Embedding(config.num_queries, hidden_dim)
        needs_projection = in_features != hidden_dim or config.enforce_input_projection
        self.input_projections = nn.ModuleList([
            nn.Conv2d(in_features, hidden_dim, kernel_size=1) if needs_projection else nn.Sequential()
            for _ in range(NUM_FEATURE_LEVELS)
        ])
        self.decoder = Mask2FormerMaskedAttentionDecoder(config)
        self.level_embed = nn.Embedding(NUM_FEATURE_LEVELS, hidden_dim)

    def forward(self, multi_scale_features: tuple[torch.Tensor, ...], mask_features: torch.Tensor,
                output_hidden_states: bool = False, output_attentions: bool = False,
                all_mask_predictions: bool = True) -> Mask2FormerMaskedAttentionDecoderOutput:
        memories, memory_positions, level_sizes = [], [], []
        for level in range(NUM_FEATURE_LEVELS):
            feature = multi_scale_features[level]
            height, width = feature.shape[-2:]
            level_sizes.append((height, width))
            position = self.position_embedder.embedding(height, width, feature.device, feature.dtype)
            memory_positions.append(position.flatten(1).transpose(0, 1).unsqueeze(0))  # (1, h*w, C)
            projected = self.input_projections[level](feature).flatten(2).transpose(1, 2)  # (B, h*w, C)
            memories.append(projected + self.level_embed.weight[level])
        batch = mask_features.shape[0]
        query_positions = self.queries_embedder.weight.unsqueeze(0).expand(batch, -1, -1)
        queries = self.queries_features.weight.unsqueeze(0).expand(batch, -1, -1)
        return self.decoder(queries, query_positions, memories, memory_positions, mask_features, level_sizes,
                            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                            all_mask_predictions=all_mask_predictions)
