"""Configurations of the Swin backbone and of Mask2Former, read from and written to transformers' `config.json`.

Field names and defaults follow transformers 5.24 (`SwinConfig`, `Mask2FormerConfig`), so a `config.json` written
by transformers loads here and one written here loads in transformers. Keys we do not know are kept as attributes
and written back unchanged; they never make loading fail.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["SwinConfig", "Mask2FormerConfig", "CONFIG_NAME"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"

# Attributes every transformers config carries (PreTrainedConfig's fields); we keep them so outputs and JSON stay
# compatible. config.json leaves out those still at these defaults, as transformers' `use_diff` writing does.
_COMMON_DEFAULTS: dict[str, Any] = {
    "output_hidden_states": False,
    "output_attentions": False,
    "return_dict": True,
    "architectures": None,
    "dtype": None,
    "chunk_size_feed_forward": 0,
    "is_encoder_decoder": False,
    "problem_type": None,
}

# Keyword arguments of transformers' from_pretrained that only matter for downloads from the Hub; a local
# directory ignores them there too.
HUB_ONLY_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies",
                   "trust_remote_code", "_from_auto", "_from_pipeline")


def local_pretrained_path(pretrained_model_name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> Path:
    """The local path a `from_pretrained` call names: drops Hub-only keywords from `kwargs`, applies `subfolder`."""
    for name in HUB_ONLY_KWARGS:
        kwargs.pop(name, None)
    return Path(pretrained_model_name_or_path) / kwargs.pop("subfolder", "")


def dtype_from_name(dtype: Any) -> Any:
    """A torch dtype for a name such as "float16" (what config.json stores); other values unchanged."""
    if isinstance(dtype, str) and dtype != "auto":
        import torch

        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. 'float32', 'float16', 'bfloat16' or "
                             f"'auto'.")
        return resolved
    return dtype


def _json_value(value: Any) -> Any:
    """torch dtypes become their names ("float16"), as transformers writes them."""
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return str(value).split(".")[-1]
    return value


def _labels_from_json(mapping: dict | None, *, key_is_id: bool) -> dict | None:
    """JSON object keys are strings; label ids are ints (keys of id2label, values of label2id)."""
    if mapping is None:
        return None
    if key_is_id:
        return {int(k): v for k, v in mapping.items()}
    return {k: int(v) for k, v in mapping.items()}


class _JsonConfig:
    """Shared behaviour: known fields with defaults, extra keys kept verbatim, id2label/label2id, JSON in/out."""

    model_type: str = ""
    _defaults: dict[str, Any] = {}
    # transformers' attribute_map: alias -> real field
    _aliases: dict[str, str] = {}

    def __init__(self, **kwargs: Any) -> None:
        for alias, target in self._aliases.items():
            if alias in kwargs:
                kwargs.setdefault(target, kwargs.pop(alias))
        kwargs.pop("model_type", None)
        # transformers' older spelling; `dtype` wins when both are given
        torch_dtype = kwargs.pop("torch_dtype", None)
        if kwargs.get("dtype") is None:
            kwargs["dtype"] = torch_dtype
        kwargs["dtype"] = dtype_from_name(kwargs["dtype"])
        self._name_or_path = str(kwargs.pop("name_or_path", kwargs.pop("_name_or_path", "")))

        num_labels = kwargs.pop("num_labels", None)
        id2label = _labels_from_json(kwargs.pop("id2label", None), key_is_id=True)
        label2id = _labels_from_json(kwargs.pop("label2id", None), key_is_id=False)
        if id2label is not None and num_labels is not None and len(id2label) != num_labels:
            logger.warning("num_labels=%d does not match id2label of length %d; using num_labels (as transformers "
                           "does) with generated names LABEL_i.", num_labels, len(id2label))
            id2label = None
        if id2label is None:
            id2label = {i: f"LABEL_{i}" for i in range(2 if num_labels is None else num_labels)}
            label2id = None
        self.id2label: dict[int, str] = id2label
        self.label2id: dict[str, int] = label2id if label2id is not None else {v: k for k, v in id2label.items()}

        for name, default in {**_COMMON_DEFAULTS, **self._defaults}.items():
            value = kwargs.pop(name, copy.deepcopy(default))
            setattr(self, name, list(value) if isinstance(value, tuple) else value)
        # Unknown keys (transformers bookkeeping such as "dtype", "architectures", or newer fields) are kept.
        self._extra_keys: list[str] = []
        for name, value in kwargs.items():
            setattr(self, name, value)
            self._extra_keys.append(name)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: resolve transformers' attribute aliases (e.g. hidden_size).
        aliases = type(self)._aliases
        if name in aliases:
            return getattr(self, aliases[name])
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        target = type(self)._aliases.get(name)
        super().__setattr__(target if target is not None else name, value)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, num_labels: int) -> None:
        if len(self.id2label) != num_labels:
            self.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
            self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def use_return_dict(self) -> bool:
        return bool(self.return_dict)

    @property
    def torch_dtype(self) -> Any:
        """transformers' older name of `dtype`."""
        return self.dtype

    @torch_dtype.setter
    def torch_dtype(self, value: Any) -> None:
        self.dtype = value

    @property
    def name_or_path(self) -> str:
        """The directory `from_pretrained` read this configuration from ("" otherwise)."""
        return self._name_or_path

    @name_or_path.setter
    def name_or_path(self, value: str | os.PathLike) -> None:
        self._name_or_path = str(value)

    def _field_dict(self) -> dict[str, Any]:
        fields = {name: copy.deepcopy(getattr(self, name)) for name in {**_COMMON_DEFAULTS, **self._defaults}}
        fields.update({name: copy.deepcopy(getattr(self, name)) for name in self._extra_keys})
        fields["dtype"] = _json_value(fields["dtype"])
        return fields

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python values; id2label keys are ints (JSON turns them into strings)."""
        out = self._field_dict()
        out["id2label"] = dict(self.id2label)
        out["label2id"] = dict(self.label2id)
        out["model_type"] = self.model_type
        out["_name_or_path"] = self._name_or_path
        return dict(sorted(out.items()))

    def to_diff_dict(self) -> dict[str, Any]:
        """`to_dict` without the common fields still at their defaults, nor `_name_or_path` (what config.json holds)."""
        return {key: value for key, value in self.to_dict().items()
                if key != "_name_or_path" and not (key in _COMMON_DEFAULTS and value == _COMMON_DEFAULTS[key])}

    def _json_dict(self, use_diff: bool) -> dict[str, Any]:
        as_dict = self.to_diff_dict() if use_diff else self.to_dict()
        as_dict["id2label"] = {str(k): v for k, v in as_dict["id2label"].items()}
        return as_dict

    def to_json_string(self, use_diff: bool = True) -> str:
        """The JSON text of `to_diff_dict()` (or of `to_dict()` with use_diff=False), keys sorted."""
        return json.dumps(self._json_dict(use_diff), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        Path(json_file_path).write_text(self.to_json_string(use_diff=use_diff), encoding="utf-8")

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike):
        path = Path(json_file)
        try:
            config_dict = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        return cls(**config_dict)

    def update(self, config_dict: dict[str, Any]) -> None:
        """Sets every key of `config_dict` as an attribute."""
        for key, value in config_dict.items():
            setattr(self, key, value)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """As transformers: `num_labels`, `dtype`, `output_attentions` and `name_or_path` in `kwargs` go into the
        constructor; other keys override attributes the config has (a dict merges into a sub-config) and the rest
        are unused, returned as a second value with return_unused_kwargs=True."""
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        config_dict = copy.deepcopy(config_dict)
        for key in ("num_labels", "output_attentions", "name_or_path", "torch_dtype", "dtype"):
            if key in kwargs:
                value = kwargs.pop(key)
                if value != "auto":
                    config_dict[key] = value
        config = cls(**config_dict)
        unused = {}
        for key, value in kwargs.items():
            if not hasattr(config, key):
                unused[key] = value
                continue
            current = getattr(config, key)
            if isinstance(current, _JsonConfig) and isinstance(value, dict):
                value = type(current)(**{**current.to_dict(), **value})
            setattr(config, key, value)
        return (config, unused) if return_unused_kwargs else config

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False) -> None:
        """Writes `config.json` into `save_directory` (created if needed)."""
        if push_to_hub:
            raise ValueError("push_to_hub is not supported: m2f_model saves to local directories only.")
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"Cannot save a config into {directory}: it is a file, not a directory.")
        directory.mkdir(parents=True, exist_ok=True)
        self.to_json_file(directory / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Reads `config.json` from a checkpoint directory (or the JSON file itself); `kwargs` as in `from_dict`."""
        path = local_pretrained_path(pretrained_model_name_or_path, kwargs)
        if path.is_dir():
            path = path / CONFIG_NAME
        elif not path.exists():
            raise FileNotFoundError(f"No checkpoint directory or config file at {path}.")
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} has no {CONFIG_NAME}; a transformers checkpoint directory holds "
                                    f"{CONFIG_NAME} next to model.safetensors.")
        try:
            config_dict = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise ValueError(f"{path} describes a {model_type!r} model, not {cls.model_type!r}.")
        kwargs.setdefault("name_or_path", str(pretrained_model_name_or_path))
        return cls.from_dict(config_dict, **kwargs)

    def __eq__(self, other: object) -> bool:
        """Same configuration: the same config.json content (where it was loaded from does not count)."""
        return type(other) is type(self) and self.to_diff_dict() == other.to_diff_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


class SwinConfig(_JsonConfig):
    """Swin Transformer hyper-parameters as transformers' `SwinConfig` (used here only as a backbone).

    `out_features` / `out_indices` select which of `stage_names` ("stem", "stage1", ...) the backbone returns.
    """

    model_type = "swin"
    _aliases = {"num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"}
    _defaults = {
        "image_size": 224,
        "patch_size": 4,
        "num_channels": 3,
        "embed_dim": 96,
        "depths": [2, 2, 6, 2],
        "num_heads": [3, 6, 12, 24],
        "window_size": 7,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.1,
        "hidden_act": "gelu",
        "use_absolute_embeddings": False,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        "encoder_stride": 32,
    }

    def __init__(self, **kwargs: Any) -> None:
        out_features = kwargs.pop("out_features", None)
        out_indices = kwargs.pop("out_indices", None)
        # Plain attributes derived from depths/embed_dim when built, as transformers sets them (given values win,
        # later changes to depths do not update them); the backbone itself reads only depths and embed_dim.
        given = {name: kwargs.pop(name) for name in ("num_layers", "num_hidden_layers", "hidden_size", "stage_names")
                 if name in kwargs}
        super().__init__(**kwargs)
        if len(self.num_heads) != len(self.depths):
            raise ValueError(f"Swin num_heads {self.num_heads} and depths {self.depths} must have the same length.")
        self.num_layers = given.get("num_layers", given.get("num_hidden_layers", len(self.depths)))
        self.hidden_size = given.get("hidden_size", int(self.embed_dim * 2 ** (len(self.depths) - 1)))
        self.stage_names = given.get("stage_names", ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)])
        self._set_out_features(out_features, out_indices)

    def _set_out_features(self, out_features: list[str] | None, out_indices: list[int] | None) -> None:
        names = self.stage_names
        if out_features is None and out_indices is None:
            out_features, out_indices = [names[-1]], [len(names) - 1]
        elif out_features is None:
            out_indices = [i % len(names) for i in out_indices]
            out_features = [names[i] for i in out_indices]
        elif out_indices is None:
            unknown = [f for f in out_features if f not in names]
            if unknown:
                raise ValueError(f"Swin out_features {unknown} are not stages; choose from {names}.")
            out_indices = [names.index(f) for f in out_features]
        elif [names[i % len(names)] for i in out_indices] != list(out_features):
            raise ValueError(f"Swin out_features {out_features} and out_indices {out_indices} disagree "
                             f"(stage names {names}).")
        self._out_features: list[str] = list(out_features)
        self._out_indices: list[int] = list(out_indices)

    @property
    def out_features(self) -> list[str]:
        return self._out_features

    @out_features.setter
    def out_features(self, out_features: list[str]) -> None:
        """Also aligns out_indices, as transformers does."""
        self._set_out_features(out_features, None)

    @property
    def out_indices(self) -> list[int]:
        return self._out_indices

    @out_indices.setter
    def out_indices(self, out_indices: list[int]) -> None:
        """Also aligns out_features, as transformers does."""
        self._set_out_features(None, list(out_indices))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(out_features=list(self.out_features), out_indices=list(self.out_indices),
                   num_layers=self.num_layers, hidden_size=self.hidden_size, stage_names=list(self.stage_names))
        return dict(sorted(out.items()))


# transformers builds this Swin (Swin-S layout) when a Mask2FormerConfig gets no backbone_config.
_DEFAULT_BACKBONE_KWARGS = {
    "depths": [2, 2, 18, 2],
    "drop_path_rate": 0.3,
    "out_features": ["stage1", "stage2", "stage3", "stage4"],
}


class Mask2FormerConfig(_JsonConfig):
    """All hyper-parameters of Mask2Former, with transformers' names and defaults.

    `backbone_config` is a `SwinConfig` or a dict (with `"model_type": "swin"`, as in config.json).
    `hidden_size` is an alias of `hidden_dim`, `num_hidden_layers` of `decoder_layers`.
    """

    model_type = "mask2former"
    backbones_supported = ["swin"]
    _aliases = {"hidden_size": "hidden_dim", "num_hidden_layers": "decoder_layers"}
    _defaults = {
        "feature_size": 256,
        "mask_feature_size": 256,
        "hidden_dim": 256,
        "encoder_feedforward_dim": 1024,
        "activation_function": "relu",
        "encoder_layers": 6,
        "decoder_layers": 10,
        "num_attention_heads": 8,
        "dropout": 0.0,
        "dim_feedforward": 2048,
        "pre_norm": False,
        "enforce_input_projection": False,
        "common_stride": 4,
        "ignore_value": 255,
        "num_queries": 100,
        "no_object_weight": 0.1,
        "class_weight": 2.0,
        "mask_weight": 5.0,
        "dice_weight": 5.0,
        "train_num_points": 12544,
        "oversample_ratio": 3.0,
        "importance_sample_ratio": 0.75,
        "init_std": 0.02,
        "init_xavier_std": 1.0,
        "use_auxiliary_loss": True,
        "feature_strides": [4, 8, 16, 32],
        "output_auxiliary_logits": None,
    }

    def __init__(self, backbone_config: SwinConfig | dict | None = None, **kwargs: Any) -> None:
        if backbone_config is None:
            backbone_config = SwinConfig(**_DEFAULT_BACKBONE_KWARGS)
        elif not isinstance(backbone_config, (SwinConfig, dict)) and hasattr(backbone_config, "to_dict"):
            backbone_config = backbone_config.to_dict()  # e.g. a transformers SwinConfig
        if isinstance(backbone_config, dict):
            backbone_config = copy.deepcopy(backbone_config)
            model_type = backbone_config.pop("model_type", "swin")
            if model_type not in self.backbones_supported:
                raise ValueError(f"backbone_config has model_type {model_type!r}; m2f_model supports only "
                                 f"{self.backbones_supported}.")
            backbone_config = SwinConfig(**backbone_config)
        elif not isinstance(backbone_config, SwinConfig):
            raise TypeError(f"backbone_config must be a SwinConfig or a dict, got {type(backbone_config).__name__}.")
        if kwargs.get("backbone") or kwargs.get("use_timm_backbone"):
            raise ValueError("Named/timm backbones (config.backbone, use_timm_backbone) are not supported; give a "
                             "Swin backbone_config instead.")
        self.backbone_config: SwinConfig = backbone_config
        super().__init__(**kwargs)

    @classmethod
    def from_backbone_config(cls, backbone_config: SwinConfig | dict, **kwargs: Any) -> "Mask2FormerConfig":
        """A Mask2Former configuration around the given backbone configuration."""
        return cls(backbone_config=backbone_config, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["backbone_config"] = self.backbone_config.to_dict()
        return dict(sorted(out.items()))

    def to_diff_dict(self) -> dict[str, Any]:
        out = super().to_diff_dict()
        out["backbone_config"] = self.backbone_config.to_diff_dict()
        return out

    def _json_dict(self, use_diff: bool) -> dict[str, Any]:
        as_dict = super()._json_dict(use_diff)
        as_dict["backbone_config"] = self.backbone_config._json_dict(use_diff)
        return as_dict
