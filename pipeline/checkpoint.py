"""Loading the model checkpoint (a local or remote directory in transformers' layout) for the pipeline stages.

The driver resolves the model once before any data moves (`pipeline.model_spec.resolve_model`), so a model
that cannot load fails the job at once with a message naming the directory and the fix, instead of actors
dying one after another.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.storage import StorageConfig

__all__ = ["ModelLoadError", "localize_checkpoint", "load_processor", "load_model", "TORCH_DTYPES"]

TORCH_DTYPES = ("float32", "bfloat16", "float16")
_REQUIRED_FILES = ("config.json", "preprocessor_config.json")


class ModelLoadError(RuntimeError):
    """The model directory cannot be used; the message names it and says what is wrong."""


def localize_checkpoint(model_uri: str, storage: StorageConfig, *,
                        required_files: tuple[str, ...] = _REQUIRED_FILES) -> Path:
    """A local directory holding the checkpoint (downloaded once per machine when remote)."""
    try:
        local = storage.localize_directory(model_uri)
    except Exception as error:  # noqa: BLE001 - any failure here means the model is unusable
        raise ModelLoadError(f"cannot fetch the model directory {model_uri}: {type(error).__name__}: {error}") \
            from error
    if not local.is_dir():
        raise ModelLoadError(f"model directory {model_uri} does not exist; pass --model with a folder holding "
                             "config.json, model.safetensors and preprocessor_config.json")
    missing = [name for name in required_files if not (local / name).is_file()]
    if missing:
        raise ModelLoadError(f"model directory {model_uri} lacks {', '.join(missing)}; save the model and its "
                             "image processor there with save_pretrained()")
    return local


def load_processor(local_dir: Path):
    from m2f_model import Mask2FormerImageProcessor

    try:
        return Mask2FormerImageProcessor.from_pretrained(str(local_dir))
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the image processor from {local_dir}: {type(error).__name__}: "
                             f"{error}") from error


def load_model(local_dir: Path, *, device: str = "cpu", dtype: str = "float32", config=None):
    """The model in eval mode on `device`, cast to `dtype`; `config` (a Mask2FormerConfig) instead of config.json."""
    import torch
    from m2f_model import Mask2FormerForUniversalSegmentation

    if dtype not in TORCH_DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    try:
        model = Mask2FormerForUniversalSegmentation.from_pretrained(str(local_dir), config=config)
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the model from {local_dir}: {type(error).__name__}: {error}") from error
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()
