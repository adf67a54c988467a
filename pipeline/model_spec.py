"""The model of a run, resolved once on the driver into a small picklable spec that every stage receives.

Stages never re-read the checkpoint's JSON files: decode actors build the image processor from
`processor_config`, writers take labels and the model id from the spec, and only model actors touch the
weights (through `uri`, downloaded once per machine when remote).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoint import load_model, load_processor, localize_checkpoint
from pipeline.storage import StorageConfig

__all__ = ["ModelSpec", "resolve_model", "model_id", "read_id2label"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_DIGEST_CHARS = 12


@dataclass(frozen=True)
class ModelSpec:
    uri: str  # as given to the job (local folder or remote URI): where model actors fetch the weights
    model_id: str  # "<folder name>@<sha256 prefix of the weights>": the `model` column of the segments table
    id2label: dict[int, str]
    num_labels: int
    config: dict  # config.json as Mask2FormerConfig.to_dict() gives it
    processor_config: dict  # preprocessor_config.json as Mask2FormerImageProcessor.to_dict() gives it
    weights_bytes: int  # size of the weight file: what a model actor holds in memory at least

    def processor(self):
        from m2f_model import Mask2FormerImageProcessor

        return Mask2FormerImageProcessor.from_dict(self.processor_config)

    def load_model(self, storage: StorageConfig, *, device: str, dtype: str):
        """The model in eval mode on `device`; the weights come from `uri`, the configuration from the spec."""
        from m2f_model import Mask2FormerConfig

        # Only the weights are needed here: the JSON files were read once, on the driver.
        return load_model(localize_checkpoint(self.uri, storage, required_files=()), device=device, dtype=dtype,
                          config=Mask2FormerConfig.from_dict(self.config))


def read_id2label(local_dir: Path) -> dict[int, str]:
    """The labels of a local checkpoint, from its config.json alone (for tools that need nothing else)."""
    config = json.loads((Path(local_dir) / "config.json").read_text())
    return {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}


def _weights_file(local_dir: Path) -> Path | None:
    return next((Path(local_dir) / name for name in _WEIGHT_FILES if (Path(local_dir) / name).is_file()), None)


def model_id(local_dir: Path, name: str) -> str:
    """A stable id for a checkpoint: its folder name and a digest of its weight file."""
    weights = _weights_file(local_dir)
    if weights is None:
        return name
    with open(weights, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return f"{name}@{digest[:_DIGEST_CHARS]}"


def resolve_model(model_uri: str, storage: StorageConfig) -> ModelSpec:
    """Loads processor and model once on the driver (raising ModelLoadError with the reason) and describes them."""
    local = localize_checkpoint(model_uri, storage)
    processor = load_processor(local)
    model = load_model(local)
    id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    num_labels = int(model.class_predictor.out_features - 1) if hasattr(model, "class_predictor") \
        else len(id2label)
    name = posixpath.basename(model_uri.rstrip("/")) or Path(local).name
    weights = _weights_file(local)
    return ModelSpec(uri=model_uri, model_id=model_id(local, name), id2label=id2label, num_labels=num_labels,
                     config=model.config.to_dict(), processor_config=processor.to_dict(),
                     weights_bytes=weights.stat().st_size if weights is not None else 0)
