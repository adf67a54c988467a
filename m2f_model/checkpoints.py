"""Loading and saving checkpoints in transformers' layout (`config.json` + `model.safetensors`).

Our module tree mirrors transformers' Mask2Former, so most parameter names are identical. The differences are
listed in ONE table, `TRANSFORMERS_TO_OURS`, applied in order to every checkpoint key:

- Swin blocks: the on-disk layout (what the Hub checkpoints hold and what transformers 5.24 still writes) uses
  `attention.self.{query,key,value}`, `attention.output.dense`, `intermediate.dense`, `output.dense`; we name them
  `attention.{q,k,v,o}_proj` and `mlp.fc{1,2}` (as transformers 5.x does in memory).
- transformers 5.x in-memory names (a state dict saved with `torch.save(model.state_dict())`) put the backbone
  under `encoder.swin.` and the bias table under `attention.relative_position_bias.`.

`IGNORED_CHECKPOINT_KEYS` lists keys that may be present but carry no weight of ours (checked, then dropped).
Saving applies `OURS_TO_TRANSFORMERS`, the inverse of the Swin rows, so transformers' `from_pretrained` reads
our files like its own.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .configuration import CONFIG_NAME, Mask2FormerConfig, dtype_from_name, local_pretrained_path
from .swin import SwinBackbone, relative_position_index

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "TRANSFORMERS_TO_OURS",
    "OURS_TO_TRANSFORMERS",
    "IGNORED_CHECKPOINT_KEYS",
    "SAFETENSORS_NAME",
    "PYTORCH_BIN_NAME",
    "CheckpointError",
    "to_our_key",
    "to_transformers_key",
    "load_checkpoint_state_dict",
    "load_state_dict_into",
    "resolve_dtype",
    "from_pretrained",
    "save_pretrained",
]

logger = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
PYTORCH_BIN_NAME = "pytorch_model.bin"

_BLOCK = r"(\.blocks\.\d+\.)"

# (pattern in a transformers checkpoint key, replacement giving our key), applied in order.
TRANSFORMERS_TO_OURS: list[tuple[str, str]] = [
    # transformers 5.x in-memory layout of the backbone
    (r"\.encoder\.swin\.encoder\.", ".encoder.encoder."),
    (r"\.encoder\.swin\.embeddings\.", ".encoder.embeddings."),
    (_BLOCK + r"attention\.relative_position_bias\.relative_position_bias_table$",
     r"\1attention.relative_position_bias_table"),
    # on-disk (Hub / transformers save_pretrained) layout of a Swin block
    (_BLOCK + r"attention\.self\.query\.", r"\1attention.q_proj."),
    (_BLOCK + r"attention\.self\.key\.", r"\1attention.k_proj."),
    (_BLOCK + r"attention\.self\.value\.", r"\1attention.v_proj."),
    (_BLOCK + r"attention\.self\.relative_position_bias_table$", r"\1attention.relative_position_bias_table"),
    (_BLOCK + r"attention\.output\.dense\.", r"\1attention.o_proj."),
    (_BLOCK + r"intermediate\.dense\.", r"\1mlp.fc1."),
    (_BLOCK + r"output\.dense\.", r"\1mlp.fc2."),
]

# (our key pattern, transformers on-disk key), used by save_pretrained.
OURS_TO_TRANSFORMERS: list[tuple[str, str]] = [
    (_BLOCK + r"attention\.q_proj\.", r"\1attention.self.query."),
    (_BLOCK + r"attention\.k_proj\.", r"\1attention.self.key."),
    (_BLOCK + r"attention\.v_proj\.", r"\1attention.self.value."),
    (_BLOCK + r"attention\.relative_position_bias_table$", r"\1attention.self.relative_position_bias_table"),
    (_BLOCK + r"attention\.o_proj\.", r"\1attention.output.dense."),
    (_BLOCK + r"mlp\.fc1\.", r"\1intermediate.dense."),
    (_BLOCK + r"mlp\.fc2\.", r"\1output.dense."),
]

# Keys a checkpoint may hold that are not weights of ours: the Swin relative-position index (a constant of the
# window size; Hub checkpoints store it, transformers 5.x does not) and SwinModel's final LayerNorm, which the
# backbone never uses (transformers 5.x writes it).
IGNORED_CHECKPOINT_KEYS: list[str] = [
    r"\.attention\.(self|relative_position_bias)\.relative_position_index$",
    r"\.encoder\.(swin\.)?layernorm\.(weight|bias)$",
]


class CheckpointError(RuntimeError):
    """A checkpoint directory or weight file that cannot be loaded as asked."""


def to_our_key(key: str) -> str:
    for pattern, replacement in TRANSFORMERS_TO_OURS:
        key = re.sub(pattern, replacement, key)
    return key


def to_transformers_key(key: str) -> str:
    for pattern, replacement in OURS_TO_TRANSFORMERS:
        key = re.sub(pattern, replacement, key)
    return key


def _is_ignored(key: str) -> bool:
    return any(re.search(pattern, key) for pattern in IGNORED_CHECKPOINT_KEYS)


def _check_ignored_tensor(key: str, tensor: torch.Tensor, source: Path) -> None:
    """A stored relative_position_index must be the constant our code builds, else the file is not what it claims."""
    if not key.endswith("relative_position_index"):
        return
    window = round(tensor.numel() ** 0.25)  # stored as (w*w, w*w), or flattened (w**4,)
    expected = relative_position_index(window).reshape(-1)
    if tensor.numel() != expected.numel() or not torch.equal(tensor.reshape(-1).long(), expected):
        raise CheckpointError(f"{source}: {key} is not the relative-position index of a square Swin window; "
                              f"the checkpoint is corrupt or not a Swin backbone.")


def load_checkpoint_state_dict(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """Reads the weight file of a checkpoint directory: model.safetensors, else pytorch_model.bin."""
    directory = Path(directory)
    safetensors_path = directory / SAFETENSORS_NAME
    bin_path = directory / PYTORCH_BIN_NAME
    if safetensors_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(safetensors_path)), safetensors_path
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{safetensors_path} is not a readable safetensors file ({error}); re-download "
                                  f"or re-save the checkpoint.") from error
    if bin_path.is_file():
        try:
            state_dict = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a bad pickle/zip
            raise CheckpointError(f"{bin_path} could not be read as a weights-only PyTorch state dict "
                                  f"({type(error).__name__}: {error}).") from error
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"{bin_path} holds a {type(state_dict).__name__}, not a state dict.")
        return state_dict, bin_path
    if (directory / f"{SAFETENSORS_NAME}.index.json").is_file():
        raise CheckpointError(f"{directory} holds a sharded checkpoint; m2f_model reads only a single "
                              f"{SAFETENSORS_NAME} (re-save it with a larger max_shard_size).")
    raise CheckpointError(f"{directory} has no {SAFETENSORS_NAME} or {PYTORCH_BIN_NAME}.")


def _adapt_prefix(state_dict: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Lets a Mask2FormerModel load a ForUniversalSegmentation checkpoint and vice versa (prefix `model.`)."""
    has_prefix = any(k.startswith("model.") for k in state_dict)
    wants_prefix = any(k.startswith("model.") for k in expected)
    if has_prefix and not wants_prefix:
        return {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
    if wants_prefix and not has_prefix:
        heads = ("class_predictor.", "criterion.")
        return {(k if k.startswith(heads) else "model." + k): v for k, v in state_dict.items()}
    return state_dict


def _format_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_into(model: "nn.Module", state_dict: dict[str, torch.Tensor], *, source: Path,
                         strict: bool = True, ignore_mismatched_sizes: bool = False) -> dict[str, list[str]]:
    """Maps checkpoint names through the table and copies the tensors into `model`.

    Returns {"missing": ..., "unexpected": ..., "mismatched": ...}; with strict=True any entry raises, except
    mismatched shapes with ignore_mismatched_sizes=True (those weights keep their initialisation, as in
    transformers).
    """
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if _is_ignored(key):
            _check_ignored_tensor(key, tensor, source)
            continue
        mapped[to_our_key(key)] = tensor
    mapped = _adapt_prefix(mapped, set(own))
    if not any(k.startswith("model.") for k in own):
        # a ForUniversalSegmentation checkpoint's heads have no place in a Mask2FormerModel
        mapped = {k: v for k, v in mapped.items() if not k.startswith(("class_predictor.", "criterion."))}

    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    mismatched = sorted(f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(mapped) if mapped[k].shape != own[k].shape)
    report = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    problems = [f"{len(v)} {name} weights: {_format_keys(v)}" for name, v in report.items() if v]
    blocking = [name for name, v in report.items() if v and not (name == "mismatched" and ignore_mismatched_sizes)]
    if problems:
        message = f"{source} does not fit {type(model).__name__}: " + "; ".join(problems)
        if strict and blocking:
            raise CheckpointError(message + ". Check that config.json matches the weights, or pass strict=False "
                                            "to load what fits (ignore_mismatched_sizes=True for new heads).")
        logger.warning(message)
    loadable = {k: v for k, v in mapped.items()
                if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    return report


def _first_floating_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    return next((tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()),
                torch.get_default_dtype())


def resolve_dtype(dtype: str | torch.dtype | None, config: Mask2FormerConfig,
                  state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """transformers' rules: "auto" (or None) takes config.dtype, else the checkpoint's first floating dtype; a
    name such as "float16" or a torch dtype is used as given."""
    if dtype is None or dtype == "auto":
        return dtype_from_name(config.dtype) if config.dtype is not None else _first_floating_dtype(state_dict)
    resolved = dtype_from_name(dtype)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype={dtype!r}: give 'auto', a floating torch dtype (torch.float16) or its name "
                         f"('bfloat16').")
    return resolved


def _device_of(device_map: str | int | torch.device | dict | None) -> torch.device | None:
    """The one device a transformers `device_map` puts the whole model on; "auto" is the first accelerator."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        raise ValueError("device_map as a dict (model split over devices) is not supported; give one device, e.g. "
                         "device_map='cuda:0', or 'auto'.")
    if device_map == "auto":
        accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
        if accelerator is not None and accelerator.is_available():
            return accelerator.current_accelerator()
        return torch.device("cpu")
    return torch.device(device_map)


def from_pretrained(model_class, pretrained_model_name_or_path: str | os.PathLike, *,
                    config: Mask2FormerConfig | str | os.PathLike | None = None,
                    dtype: str | torch.dtype | None = None, torch_dtype: str | torch.dtype | None = None,
                    device_map: str | int | torch.device | None = None, device: torch.device | str | None = None,
                    strict: bool = True, ignore_mismatched_sizes: bool = False, output_loading_info: bool = False,
                    **kwargs: Any):
    """Builds `model_class` from a transformers-layout checkpoint directory, in eval mode.

    Keywords as in transformers: `dtype` ("auto" by default, like transformers 5; `torch_dtype` is its older name),
    `device_map` (one device, or "auto"), `config` (an object or a directory), `ignore_mismatched_sizes`,
    `output_loading_info`; other keywords override configuration attributes. `strict=False` also tolerates
    missing or unexpected weights (logged).
    """
    directory = local_pretrained_path(pretrained_model_name_or_path, kwargs)
    if not directory.exists():
        raise FileNotFoundError(f"Checkpoint directory {directory} does not exist.")
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file; pass the checkpoint directory that holds {CONFIG_NAME} "
                                 f"and {SAFETENSORS_NAME}.")
    if config is None:
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; it is not a Mask2Former checkpoint "
                                    f"directory.")
        config, unused = Mask2FormerConfig.from_pretrained(directory, return_unused_kwargs=True, **kwargs)
    elif isinstance(config, (str, os.PathLike)):
        config, unused = Mask2FormerConfig.from_pretrained(config, return_unused_kwargs=True, **kwargs)
    else:
        config, unused = Mask2FormerConfig.from_dict(config.to_dict(), return_unused_kwargs=True, **kwargs)
    if unused:
        raise TypeError(f"{model_class.__name__}.from_pretrained got unexpected keyword arguments {sorted(unused)} "
                        f"(neither loading options nor configuration attributes).")
    config.name_or_path = str(pretrained_model_name_or_path)
    state_dict, source = load_checkpoint_state_dict(directory)
    model_dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, config, state_dict)
    config.dtype = config.backbone_config.dtype = model_dtype  # as transformers records it
    model = model_class(config)
    report = load_state_dict_into(model, state_dict, source=source, strict=strict,
                                  ignore_mismatched_sizes=ignore_mismatched_sizes)
    model.to(device=device if device is not None else _device_of(device_map), dtype=model_dtype)
    model.eval()
    if output_loading_info:
        return model, {"missing_keys": report["missing"], "unexpected_keys": report["unexpected"],
                       "mismatched_keys": report["mismatched"], "error_msgs": []}
    return model


def _unused_transformers_tensors(model: "nn.Module", tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5.x builds SwinModel's final LayerNorm inside the backbone (never used) and reports it as
    missing when absent; we write it as an identity norm so transformers loads our files without complaint."""
    prefix = "model.pixel_level_module.encoder." if "class_predictor.weight" in tensors else \
        "pixel_level_module.encoder."
    width = next(module for module in model.modules() if isinstance(module, SwinBackbone)).num_features[-1]
    dtype = next(iter(tensors.values())).dtype
    return {prefix + "swin.layernorm.weight": torch.ones(width, dtype=dtype),
            prefix + "swin.layernorm.bias": torch.zeros(width, dtype=dtype)}


def save_pretrained(model: "nn.Module", save_directory: str | os.PathLike, *, is_main_process: bool = True,
                    state_dict: dict[str, torch.Tensor] | None = None, push_to_hub: bool = False) -> None:
    """Writes config.json and model.safetensors in the layout transformers' from_pretrained reads.

    As in transformers: config.json records the model's dtype and class; `state_dict` replaces the model's own
    tensors; only the main process writes (`is_main_process`).
    """
    from safetensors.torch import save_file

    if push_to_hub:
        raise ValueError("push_to_hub is not supported: m2f_model saves to local directories only.")
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"Cannot save a checkpoint into {directory}: it is a file.")
    if not is_main_process:
        return
    directory.mkdir(parents=True, exist_ok=True)
    config: Mask2FormerConfig = model.config
    config.dtype = config.backbone_config.dtype = model.dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = {to_transformers_key(k): v.detach().contiguous().cpu() for k, v in state_dict.items()}
    tensors.update(_unused_transformers_tensors(model, tensors))
    save_file(tensors, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
