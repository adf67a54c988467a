"""Swin Transformer backbone, numerically the same as transformers' `SwinBackbone` as Mask2Former uses it.

Behaviour that matters for parity with transformers (and the original detectron2 Swin):
- the image is zero-padded right/bottom to a multiple of the patch size before the patch convolution;
- inside each block the feature map is padded to a multiple of the window size *after* `layernorm_before`;
- "always partition": windows are never shrunk and shifts never disabled for small maps (odd blocks shift by
  window_size // 2 at every resolution), padded regions take part in attention like in transformers;
- shifted-window mask uses -100 between regions; patch merging pads odd sizes and concatenates
  [even-row even-col, odd-row even-col, even-row odd-col, odd-row odd-col];
- backbone outputs are the pre-downsampling stage maps, each through its own LayerNorm (`hidden_states_norms`).

Speed: pad + roll + window partition (and back) are one cached gather (scatter); q/k/v run as one matmul over
concatenated weights (the state dict keeps the separate projections); the relative-position bias and shift mask
are one additive mask for `scaled_dot_product_attention` on 4-D tensors (its fused kernel); shift masks and
gather indices are built once per map size.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import SwinConfig

__all__ = ["SwinBackbone"]

_SHIFT_MASK_VALUE = -100.0
# Per-shape caches keep this many entries: a pipeline resizing images keeping their aspect ratio sees many shapes.
SHAPE_CACHE_SIZE = 8


Built = TypeVar("Built")


def shape_cached(cache: dict, key: tuple, build: Callable[[], Built]) -> Built:
    """build() once per key, keeping the SHAPE_CACHE_SIZE newest entries.

    Under torch.compile the value is built inline instead: it depends only on static shapes, so it is traced into
    the graph, where the cache lookup (keyed on the inference-mode flag, which dynamo cannot read) would break it.
    """
    if torch.compiler.is_compiling():
        return build()
    # tensors made under inference_mode cannot take part in autograd later: cache them separately
    key = (*key, torch.is_inference_mode_enabled())
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
        while len(cache) > SHAPE_CACHE_SIZE:
            del cache[next(iter(cache))]
    return value


def _activation(name: str) -> nn.Module:
    activations = {"gelu": nn.GELU(), "relu": nn.ReLU(), "gelu_new": nn.GELU(approximate="tanh"),
                   "gelu_pytorch_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(), "swish": nn.SiLU()}
    if name not in activations:
        raise ValueError(f"Unsupported hidden_act {name!r}; choose one of {sorted(activations)}.")
    return activations[name]


def relative_position_index(window_size: int) -> torch.Tensor:
    """(w*w, w*w) index into the (2w-1)^2-row bias table for every pair of positions inside a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # (2, w*w)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)  # (w*w, w*w, 2)
    return relative[..., 0] * (2 * window_size - 1) + relative[..., 1]


def _partition_windows(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, w*w, C) with H, W multiples of window_size."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window_size, window_size, width // window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, -1, window_size * window_size, channels)


def shifted_window_mask(height: int, width: int, window_size: int, shift: int,
                        device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(nW, 1, w*w, w*w) additive mask: -100 between positions that came from different regions after the roll."""
    def regions(size: int) -> torch.Tensor:
        index = torch.arange(size, device=device)
        return (index >= size - window_size).long() + (index >= size - shift).long()

    region = (regions(height)[:, None] * 3 + regions(width)[None, :]).to(dtype)  # (H, W)
    region_windows = _partition_windows(region[None, :, :, None], window_size)[0, :, :, 0]  # (nW, w*w)
    different = region_windows[:, None, :] != region_windows[:, :, None]
    mask = torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, _SHIFT_MASK_VALUE)
    return mask[:, None]


class SwinDropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        noise = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * noise / keep


class SwinPatchEmbeddings(nn.Module):
    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        patch = config.patch_size
        self.patch_size = tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)
        self.projection = nn.Conv2d(config.num_channels, config.embed_dim, kernel_size=self.patch_size,
                                    stride=self.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        height, width = pixel_values.shape[-2:]
        pad_bottom = (-height) % self.patch_size[0]
        pad_right = (-width) % self.patch_size[1]
        if pad_bottom or pad_right:
            pixel_values = F.pad(pixel_values, (0, pad_right, 0, pad_bottom))
        embeddings = self.projection(pixel_values)  # (B, C, H/4, W/4)
        grid = (embeddings.shape[2], embeddings.shape[3])
        return embeddings.flatten(2).transpose(1, 2), grid


class SwinEmbeddings(nn.Module):
    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.patch_embeddings = SwinPatchEmbeddings(config)
        if config.use_absolute_embeddings:
            image = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
            patch = self.patch_embeddings.patch_size
            num_patches = (image[0] // patch[0]) * (image[1] // patch[1])
            self.position_embeddings = nn.Parameter(torch.zeros(1, num_patches, config.embed_dim))
        else:
            self.position_embeddings = None
        self.norm = nn.LayerNorm(config.embed_dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        embeddings, grid = self.patch_embeddings(pixel_values)
        embeddings = self.norm(embeddings)  # (B, H/4*W/4, C)
        if self.position_embeddings is not None:
            if self.position_embeddings.shape[1] != embeddings.shape[1]:
                raise ValueError(f"Absolute position embeddings cover {self.position_embeddings.shape[1]} patches "
                                 f"but the input has {embeddings.shape[1]}; feed images of config.image_size.")
            embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings), grid


class SwinWindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative-position bias."""

    def __init__(self, config: SwinConfig, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Swin stage width {dim} is not divisible by its {num_heads} heads.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = config.window_size
        self.attention_dropout = config.attention_probs_dropout_prob
        self.q_proj = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * config.window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(config.window_size),
                             persistent=False)

    def init_buffers(self) -> None:
        """Rebuilds the index (a non-persistent buffer) where the module lives, e.g. after `to_empty()`."""
        self.relative_position_index = relative_position_index(self.window_size).to(
            self.relative_position_bias_table.device)

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, w*w, w*w)"""
        area = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(area, area, self.num_heads).permute(2, 0, 1)

    def _qkv_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        if self.q_proj.bias is None:
            return weight, None
        return weight, torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias))

    def forward(self, windows: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        """windows: (B, nW, N, C); shift_mask: (nW, 1, N, N) or None. Returns (B, nW, N, C)."""
        batch, num_windows, tokens, channels = windows.shape
        qkv = F.linear(windows, *self._qkv_weights())  # (B, nW, N, 3C)
        # 4-D (B*nW, heads, N, d) tensors keep scaled_dot_product_attention on its fused CPU/GPU kernels
        qkv = qkv.view(batch * num_windows, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        mask = self.relative_position_bias().to(windows.dtype).unsqueeze(0)  # (1, heads, N, N)
        if shift_mask is not None:
            mask = mask + shift_mask  # (nW, heads, N, N)
            if batch > 1:
                mask = mask.expand(batch, -1, -1, -1, -1).reshape(batch * num_windows, self.num_heads, tokens, tokens)
        dropout = self.attention_dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout)
        context = context.transpose(1, 2).reshape(batch, num_windows, tokens, channels)
        return self.o_proj(context)


class SwinMLP(nn.Module):
    def __init__(self, config: SwinConfig, dim: int) -> None:
        super().__init__()
        hidden = int(config.mlp_ratio * dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.activation = _activation(config.hidden_act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


def window_token_order(height: int, width: int, window_size: int, shift: int, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors that replace pad + roll + window partition (and their inverse) by one gather each.

    gather: (nW * w*w,) index into a (H*W + 1)-row map whose last row is zeros: the token at each window
    position after zero-padding to window multiples and rolling by -shift. scatter: (H*W,) position of every
    original token in that window order.
    """
    padded_height = height + (-height) % window_size
    padded_width = width + (-width) % window_size
    rows = torch.arange(padded_height, device=device)[:, None]
    cols = torch.arange(padded_width, device=device)[None, :]
    source = torch.where((rows < height) & (cols < width), rows * width + cols, height * width)  # (Hp, Wp)
    source = torch.roll(source, shifts=(-shift, -shift), dims=(0, 1))
    gather = _partition_windows(source[None, :, :, None], window_size).reshape(-1)
    scatter = torch.empty(height * width + 1, dtype=torch.long, device=device)
    scatter[gather] = torch.arange(gather.numel(), device=device)
    return gather, scatter[:-1].clone()


class SwinBlock(nn.Module):
    """One (shifted-)window attention block: x + attn(LN(x)), then x + MLP(LN(x)).

    As in transformers, the map is zero-padded to window multiples after `layernorm_before` and rolled by
    -shift before partitioning; here those three moves are one cached gather (and one scatter back).
    """

    def __init__(self, config: SwinConfig, dim: int, num_heads: int, shift_size: int, drop_path: float) -> None:
        super().__init__()
        self.window_size = config.window_size
        self.shift_size = shift_size
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = SwinWindowAttention(config, dim, num_heads)
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = SwinMLP(config, dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path = SwinDropPath(drop_path)
        self._geometry: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def _window_geometry(self, height: int, width: int, device: torch.device, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(gather, scatter, shift mask or None) for this map size, built once."""
        def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            gather, scatter = window_token_order(height, width, self.window_size, self.shift_size, device)
            mask = None
            if self.shift_size:
                mask = shifted_window_mask(height + (-height) % self.window_size, width + (-width) % self.window_size,
                                           self.window_size, self.shift_size, device, dtype)
            return gather, scatter, mask

        return shape_cached(self._geometry, (height, width, device, dtype), build)

    def forward(self, hidden_states: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """hidden_states: (B, H*W, C) -> (B, H*W, C)."""
        height, width = grid
        batch, tokens, channels = hidden_states.shape
        area = self.window_size * self.window_size
        gather, scatter, shift_mask = self._window_geometry(height, width, hidden_states.device, hidden_states.dtype)
        normed = self.layernorm_before(hidden_states)
        if gather.numel() != tokens:
            # padding to window multiples: padded positions read the extra zero row
            normed = torch.cat((normed, normed.new_zeros(batch, 1, channels)), 1)
        windows = normed.index_select(1, gather).view(batch, -1, area, channels)  # (B, nW, w*w, C)
        attended = self.dropout(self.attention(windows, shift_mask))
        attended = attended.view(batch, -1, channels).index_select(1, scatter)  # (B, H*W, C)
        hidden_states = hidden_states + self.drop_path(attended)
        return hidden_states + self.dropout(self.mlp(self.layernorm_after(hidden_states)))


class SwinPatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: (B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, hidden_states: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        height, width = grid
        batch, _, channels = hidden_states.shape
        x = hidden_states.view(batch, height, width, channels)
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(batch, -1, 4 * channels)))


class SwinStage(nn.Module):
    def __init__(self, config: SwinConfig, dim: int, depth: int, num_heads: int, drop_paths: list[float],
                 downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(config, dim, num_heads, shift_size=0 if i % 2 == 0 else config.window_size // 2,
                      drop_path=drop_paths[i])
            for i in range(depth)
        ])
        self.downsample = SwinPatchMerging(dim) if downsample else None

    def forward(self, hidden_states: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (stage output before downsampling, input of the next stage)."""
        for block in self.blocks:
            hidden_states = block(hidden_states, grid)
        if self.downsample is None:
            return hidden_states, hidden_states
        return hidden_states, self.downsample(hidden_states, grid)


class SwinEncoder(nn.Module):
    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        total_depth = sum(config.depths)
        drop_paths = [config.drop_path_rate * i / max(total_depth - 1, 1) for i in range(total_depth)]
        num_stages = len(config.depths)
        self.layers = nn.ModuleList()
        for index, depth in enumerate(config.depths):
            start = sum(config.depths[:index])
            self.layers.append(SwinStage(config, dim=int(config.embed_dim * 2 ** index), depth=depth,
                                         num_heads=config.num_heads[index], drop_paths=drop_paths[start:start + depth],
                                         downsample=index < num_stages - 1))


class SwinBackbone(nn.Module):
    """Patch embedding + Swin stages; returns the LayerNorm-ed maps of `config.out_features` as (B, C, H, W)."""

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = SwinEmbeddings(config)
        self.encoder = SwinEncoder(config)
        self.num_features = [config.embed_dim] + [int(config.embed_dim * 2 ** i) for i in range(len(config.depths))]
        self.out_features = list(config.out_features)
        self.channels = [self.num_features[config.stage_names.index(name)] for name in self.out_features]
        self.hidden_states_norms = nn.ModuleDict({
            name: nn.LayerNorm(channels) for name, channels in zip(self.out_features, self.channels)
        })

    def _stage_output(self, name: str, hidden_states: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, _, channels = hidden_states.shape
        normed = self.hidden_states_norms[name](hidden_states)
        return normed.transpose(1, 2).reshape(batch, channels, grid[0], grid[1])

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """pixel_values (B, 3, H, W) -> feature maps, one per out_feature (stage1: (B, C, ceil(H/4), ceil(W/4)), ...)."""
        hidden_states, grid = self.embeddings(pixel_values)
        feature_maps = []
        if "stem" in self.hidden_states_norms:
            feature_maps.append(self._stage_output("stem", hidden_states, grid))
        for index, stage in enumerate(self.encoder.layers):
            stage_output, hidden_states = stage(hidden_states, grid)
            name = f"stage{index + 1}"
            if name in self.hidden_states_norms:
                feature_maps.append(self._stage_output(name, stage_output, grid))
            if stage.downsample is not None:
                grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        return tuple(feature_maps)


def _normal_init(module: nn.Module, std: float) -> None:
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def init_swin_weights(backbone: SwinBackbone, std: float) -> None:
    """transformers' Swin initialisation: linear/conv N(0, std), norms (1, 0), bias table and abs. pos-emb zero;
    the relative-position indices rebuilt."""
    for module in backbone.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            _normal_init(module, std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, SwinWindowAttention):
            nn.init.zeros_(module.relative_position_bias_table)
            module.init_buffers()
    if backbone.embeddings.position_embeddings is not None:
        nn.init.zeros_(backbone.embeddings.position_embeddings)

