"""Mask2FormerImageProcessor: preprocessing, training targets and post-processing, in plain PyTorch.

Mirrors transformers 5.24's default `Mask2FormerImageProcessor` (its torchvision backend): the same
parameters, defaults, `preprocessor_config.json` keys and results (pixel_values within 1e-4;
pixel_mask, mask_labels and class_labels exactly). Everything runs as torch ops on the input
tensor's device (or `device=`), and images of the same shape are resized as one batch.

The post-processors live in `post_processing.py`; the methods here forward to them.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL.Image import Resampling

from . import post_processing
from .configuration import local_pretrained_path
from .outputs import BatchFeature

logger = logging.getLogger(__name__)

__all__ = ["BatchFeature", "Mask2FormerImageProcessor", "segmentation_map_to_binary_masks"]

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = {"shortest_edge": 800, "longest_edge": 1333}

# PIL resampling filter ids (what preprocessor_config.json stores) -> torch interpolation modes.
# NEAREST maps to "nearest-exact", as transformers' torchvision backend does.
_RESAMPLE_TO_TORCH_MODE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
_SIZE_KEY_SETS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"}, {"longest_edge"},
                  {"max_height", "max_width"})
# Keys of old preprocessor configs that transformers 5.24 stores but never reads.
_IGNORED_LEGACY_KEYS = {"reduce_labels": "do_reduce_labels", "size_divisibility": "size_divisor"}
_DROPPED_CONFIG_KEYS = ("feature_extractor_type", "processor_class", "image_processor_type", "_max_size")


def _normalise_size(size: Any, *, max_size: int | None = None, param_name: str = "size") -> dict[str, int]:
    """transformers' size conventions: int -> shortest edge (+ max_size), (h, w) -> fixed, dict as is."""
    if size is None:
        if max_size is None:
            raise ValueError(f"{param_name} is None; give a dict such as {{'height': 384, 'width': 384}}")
        return {"longest_edge": int(max_size)}
    if isinstance(size, Mapping):
        size_dict = {key: int(value) for key, value in size.items() if value is not None}
    elif isinstance(size, int):
        size_dict = {"shortest_edge": size} if max_size is None else {"shortest_edge": size, "longest_edge": max_size}
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        size_dict = {"height": int(size[0]), "width": int(size[1])}
    else:
        raise ValueError(f"{param_name}={size!r} is not a size; give an int, (height, width) or a dict")
    if set(size_dict) not in _SIZE_KEY_SETS:
        raise ValueError(f"{param_name} must have one of the key sets {[sorted(k) for k in _SIZE_KEY_SETS]}, "
                         f"got {sorted(size_dict)}")
    return size_dict


def _resample_id(resample: Any) -> int:
    """A PIL resampling filter id from an int, a PIL enum or a name such as "bilinear"."""
    if isinstance(resample, str):
        names = {name.lower(): value for value, name in _RESAMPLE_NAMES.items()}
        if resample.lower() not in names:
            raise ValueError(f"resample={resample!r} is unknown; use one of {sorted(names)}")
        return names[resample.lower()]
    value = getattr(resample, "value", resample)
    if isinstance(value, str):  # a torchvision InterpolationMode
        return _resample_id(value.replace("nearest-exact", "nearest"))
    if int(value) not in _RESAMPLE_NAMES:
        raise ValueError(f"resample={resample!r} is not a PIL resampling filter id (0-5)")
    return int(value)


def _output_size(height: int, width: int, size: Mapping[str, int], size_divisor: int) -> tuple[int, int]:
    """The resized (height, width) for one image, as transformers' Mask2Former processor computes it."""
    if "shortest_edge" in size and "longest_edge" in size:
        new_height, new_width = _size_keeping_aspect_ratio(height, width, size["shortest_edge"], size["longest_edge"])
    elif "max_height" in size and "max_width" in size:
        scale = min(size["max_height"] / height, size["max_width"] / width)
        new_height, new_width = int(height * scale), int(width * scale)
    elif "height" in size and "width" in size:
        new_height, new_width = size["height"], size["width"]
    else:
        raise ValueError(f"Size must contain 'height' and 'width' keys or 'shortest_edge' and 'longest_edge' keys. "
                         f"Got {dict(size)}.")
    if size_divisor and size_divisor > 0:
        # Rounds UP (a slight stretch), it does not pad: the reference processor's behaviour.
        new_height = int(math.ceil(new_height / size_divisor) * size_divisor)
        new_width = int(math.ceil(new_width / size_divisor) * size_divisor)
    return new_height, new_width


def _size_keeping_aspect_ratio(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    raw_size = None
    short_side, long_side = float(min(height, width)), float(max(height, width))
    if long_side / short_side * shortest > longest:
        raw_size = longest * short_side / long_side
        shortest = int(round(raw_size))
    if (height <= width and height == shortest) or (width <= height and width == shortest):
        return height, width
    if width < height:
        new_width = shortest
        new_height = int(raw_size * height / width) if raw_size is not None else int(shortest * height / width)
    else:
        new_height = shortest
        new_width = int(raw_size * width / height) if raw_size is not None else int(shortest * width / height)
    return new_height, new_width


def _native_uint8_resize(mode: str, device: torch.device) -> bool:
    """Whether torch resizes uint8 directly (as torchvision does) instead of going through float32."""
    if device.type != "cpu":
        return False
    if mode == "bilinear":
        return (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                or platform.machine() in ("aarch64", "arm64"))
    return mode == "bicubic"


def _resize_batch(batch: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """Resizes (N, C, H, W) like torchvision's `resize(..., antialias=True)`, dtype kept."""
    if tuple(batch.shape[-2:]) == tuple(size) or batch.numel() == 0:
        return batch
    if resample not in _RESAMPLE_TO_TORCH_MODE:
        from torchvision.transforms.v2 import functional as tv_functional  # BOX/HAMMING/LANCZOS only

        return tv_functional.resize(batch, list(size), interpolation=tv_functional.InterpolationMode[
            _RESAMPLE_NAMES[resample]], antialias=True)
    mode = _RESAMPLE_TO_TORCH_MODE[resample]
    dtype = batch.dtype
    keeps_dtype = dtype in (torch.float32, torch.float64) or (
        dtype == torch.uint8 and (mode == "nearest-exact" or _native_uint8_resize(mode, batch.device)))
    work = batch if keeps_dtype else batch.to(torch.float32)
    if mode == "nearest-exact":
        resized = F.interpolate(work, size=size, mode=mode)
    else:
        resized = F.interpolate(work, size=size, mode=mode, align_corners=False, antialias=True)
    if keeps_dtype:
        return resized
    if mode == "bicubic" and dtype == torch.uint8:
        resized = resized.clamp_(0, 255)
    if not dtype.is_floating_point:
        resized = resized.round_()
    return resized.to(dtype)


def _channel_dimension(image: torch.Tensor | np.ndarray, input_data_format: str | None) -> str:
    if input_data_format is not None:
        value = str(getattr(input_data_format, "value", input_data_format))
        if value not in ("channels_first", "channels_last"):
            raise ValueError(f"input_data_format={input_data_format!r}; use 'channels_first' or 'channels_last'")
        return value
    # transformers' rules and wording (code matches on them): channels-first wins, with a warning, when both
    # ends could be channels.
    first_fits, last_fits = image.shape[0] in (1, 3, 4), image.shape[-1] in (1, 3, 4)
    if first_fits and last_fits:
        logger.warning("The channel dimension is ambiguous. Got image shape %s. Assuming channels are the first "
                       "dimension. Use the input_data_format parameter to assign the channel dimension.",
                       tuple(image.shape))
    if first_fits:
        return "channels_first"
    if last_fits:
        return "channels_last"
    raise ValueError(f"Unable to infer channel dimension format of an image of shape {tuple(image.shape)}; pass "
                     f"input_data_format='channels_first' or 'channels_last'")


def _is_pil_image(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.") and hasattr(value, "getbands")


def _is_image(value: Any) -> bool:
    return _is_pil_image(value) or isinstance(value, (np.ndarray, torch.Tensor))


def _flat_image_list(images: Any, expected_ndims: int, what: str) -> list:
    """One flat list of single images from a single image, a batch array, a list or a list of lists."""
    if isinstance(images, (list, tuple)):
        if images and all(isinstance(item, (list, tuple)) for item in images):
            return [image for group in images for image in group]
        if all(_is_image(item) for item in images) and images:
            first = images[0]
            if _is_pil_image(first) or first.ndim == expected_ndims:
                return list(images)
            if first.ndim == expected_ndims + 1:
                return [image for batch in images for image in batch]
    elif _is_image(images):
        if _is_pil_image(images) or images.ndim == expected_ndims:
            return [images]
        if images.ndim == expected_ndims + 1:
            return list(images)
    raise ValueError(f"{what} must be a PIL image, a numpy array or torch tensor ({expected_ndims}-D, or "
                     f"{expected_ndims + 1}-D for a batch), or a list of them; got {type(images).__name__}")


def _pil_to_rgb_array(image: Any) -> np.ndarray:
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


def _image_to_chw(image: Any, *, do_convert_rgb: bool, input_data_format: str | None,
                  device: torch.device | str | None) -> torch.Tensor:
    """One input image as a (C, H, W) tensor, no copy where a view will do."""
    if _is_pil_image(image):
        array = _pil_to_rgb_array(image) if do_convert_rgb else np.array(image)
        tensor = torch.from_numpy(array)
        layout = "channels_last"
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
        layout = None
    if tensor.ndim == 2:
        tensor, layout = tensor.unsqueeze(0), "channels_first"
    if tensor.ndim != 3:
        raise ValueError(f"an image must be 2-D or 3-D, got shape {tuple(tensor.shape)}")
    layout = layout or _channel_dimension(tensor, input_data_format)
    if layout == "channels_last":
        tensor = tensor.permute(2, 0, 1)
    if do_convert_rgb and not _is_pil_image(image):
        if tensor.shape[0] == 1:
            tensor = tensor.expand(3, -1, -1)
        elif tensor.shape[0] == 4:
            raise ValueError("do_convert_rgb with a 4-channel array: composite the alpha channel first, or pass "
                             "a PIL image")
    if device is not None:
        tensor = tensor.to(device)
    return tensor


def _segmentation_map_to_tensor(segmentation_map: Any, device: torch.device | str | None) -> torch.Tensor:
    if _is_pil_image(segmentation_map):
        tensor = torch.from_numpy(np.array(segmentation_map))
    elif isinstance(segmentation_map, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(segmentation_map))
    else:
        tensor = segmentation_map
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2:
        raise ValueError(f"a segmentation map must be (height, width), got shape {tuple(tensor.shape)}")
    return tensor if device is None else tensor.to(device)


def _stack_same_shape(images: list[torch.Tensor]) -> torch.Tensor:
    """(N, C, H, W) from same-shape (C, H, W) tensors; channels-last views stay channels-last (faster resize)."""
    if len(images) == 1:
        return images[0].unsqueeze(0)
    if all(image.permute(1, 2, 0).is_contiguous() for image in images):
        return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    return torch.stack(images)


def segmentation_map_to_binary_masks(
    segmentation_map: torch.Tensor,
    instance_id_to_semantic_id: Mapping[int, int] | None = None,
    ignore_index: int | None = None,
    do_reduce_labels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One binary mask per id present in a (H, W) map, and the class of each mask.

    Returns `masks` (N, H, W) float32 in ascending id order and `labels` (N,) int64. With
    `instance_id_to_semantic_id` the map holds instance ids and each mask's class is looked up;
    `do_reduce_labels` turns 0 into `ignore_index` and shifts every other id down by one first.
    """
    if do_reduce_labels and ignore_index is None:
        raise ValueError("do_reduce_labels=True needs ignore_index (the value background 0 becomes), e.g. 255")
    if do_reduce_labels:
        segmentation_map = torch.where(segmentation_map == 0, ignore_index, segmentation_map - 1)
    present_ids = torch.unique(segmentation_map)
    if ignore_index is not None:
        present_ids = present_ids[present_ids != ignore_index]
    masks = (segmentation_map.unsqueeze(0) == present_ids.view(-1, 1, 1)).to(torch.float32)  # (N, H, W)
    if instance_id_to_semantic_id is None:
        return masks, present_ids.long()
    classes = []
    for instance_id in present_ids.tolist():
        key = instance_id + 1 if do_reduce_labels else instance_id
        if key not in instance_id_to_semantic_id:
            raise KeyError(f"instance id {key} is in the segmentation map but not in instance_id_to_semantic_id "
                           f"(keys {sorted(instance_id_to_semantic_id)[:20]}); add it or mark it ignore_index")
        class_id = instance_id_to_semantic_id[key]
        classes.append(class_id - 1 if do_reduce_labels else class_id)
    # The reference goes through a float32 buffer; mimic the cast so huge ids round the same way.
    labels = torch.tensor(classes, dtype=torch.float32, device=segmentation_map.device).long()
    return masks, labels


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-save it with save_pretrained") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


class Mask2FormerImageProcessor:
    """Prepares images (and segmentation maps) for Mask2Former and turns its outputs into segmentations.

    Same parameters and defaults as transformers' `Mask2FormerImageProcessor`:
    resize (shortest/longest edge keeping the aspect ratio, or a fixed {"height", "width"}; then both
    sides rounded UP to a multiple of `size_divisor`), rescale by `rescale_factor`, normalise with
    `image_mean`/`image_std`, pad bottom/right with zeros to the batch's largest image (or to
    `pad_size`) and return `pixel_mask` (1 = image, 0 = padding). Segmentation maps become binary
    `mask_labels` and `class_labels`, padded with `ignore_index` (0 when None) like the reference.

    Unlike transformers, `return_tensors` defaults to "pt" (stacked tensors); pass None for lists.
    """

    model_input_names = ["pixel_values", "pixel_mask"]

    def __init__(
        self,
        *,
        do_resize: bool = True,
        size: int | Sequence[int] | Mapping[str, int] | None = None,
        size_divisor: int = 32,
        resample: int | Any = Resampling.BILINEAR,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: float | Sequence[float] = IMAGENET_DEFAULT_STD,
        ignore_index: int | None = None,
        do_reduce_labels: bool = False,
        num_labels: int | None = None,
        pad_size: int | Sequence[int] | Mapping[str, int] | None = None,
        do_convert_rgb: bool | None = None,
        max_size: int | None = None,
        **extra: Any,
    ) -> None:
        # `max_size` is transformers' deprecated spelling of size["longest_edge"].
        if size is None:
            size = dict(DEFAULT_SIZE)
            if max_size is not None:
                size["longest_edge"] = max_size
        self.size = _normalise_size(size, max_size=max_size)
        self.do_resize = do_resize
        self.size_divisor = size_divisor
        # ints and PIL enums are kept as given (transformers' to_dict returns them so); names and torchvision
        # modes become the PIL enum, which config files store as its int
        self.resample = resample if isinstance(resample, int) else Resampling(_resample_id(resample))
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = tuple(image_mean) if isinstance(image_mean, Iterable) else image_mean
        self.image_std = tuple(image_std) if isinstance(image_std, Iterable) else image_std
        self.ignore_index = ignore_index
        self.do_reduce_labels = do_reduce_labels
        self.num_labels = num_labels
        self.pad_size = None if pad_size is None else _normalise_size(pad_size, param_name="pad_size")
        self.do_convert_rgb = do_convert_rgb
        for key in _DROPPED_CONFIG_KEYS:
            extra.pop(key, None)
        for legacy_key, current_key in _IGNORED_LEGACY_KEYS.items():
            if legacy_key in extra and extra[legacy_key] != getattr(self, current_key):
                logger.warning("%s=%r is ignored (transformers 5.24 ignores it too); set %s=%r to use it",
                               legacy_key, extra[legacy_key], current_key, extra[legacy_key])
        # Unknown keys are kept and saved back, as transformers does.
        self.extra_attributes = dict(extra)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    # ----------------------------------------------------------------------------- config in/out
    def to_dict(self) -> dict[str, Any]:
        """The preprocessor_config.json content, with transformers' key names and value types (mean/std tuples,
        resample as given)."""
        config: dict[str, Any] = dict(self.extra_attributes)
        config.update({
            "do_resize": self.do_resize,
            "size": dict(self.size),
            "size_divisor": self.size_divisor,
            "resample": self.resample,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "do_reduce_labels": self.do_reduce_labels,
            "image_processor_type": "Mask2FormerImageProcessor",
        })
        for key in ("ignore_index", "num_labels", "pad_size", "do_convert_rgb"):
            value = getattr(self, key)
            if value is not None:
                config[key] = dict(value) if isinstance(value, dict) else value
        return config

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        Path(json_file_path).write_text(self.to_json_string(), encoding="utf-8")

    @classmethod
    def from_dict(cls, image_processor_dict: Mapping[str, Any], **kwargs: Any) -> "Mask2FormerImageProcessor":
        """A processor from `preprocessor_config.json` content; `kwargs` override its keys."""
        return cls(**{**image_processor_dict, **kwargs})

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike) -> "Mask2FormerImageProcessor":
        return cls(**_read_json_object(Path(json_file)))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike,
                        **kwargs: Any) -> "Mask2FormerImageProcessor":
        """Reads `preprocessor_config.json` from a checkpoint directory (or the path of that file); `kwargs`
        override its keys."""
        path = local_pretrained_path(pretrained_model_name_or_path, kwargs)
        config_path = path if path.is_file() else path / PREPROCESSOR_CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"no {PREPROCESSOR_CONFIG_NAME} in {path}; save one with "
                                    f"Mask2FormerImageProcessor(...).save_pretrained({str(path)!r})")
        return cls.from_dict(_read_json_object(config_path), **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False) -> list[str]:
        """Writes `preprocessor_config.json` (transformers reads it back); returns the files written, as
        transformers does."""
        if push_to_hub:
            raise ValueError("push_to_hub is not supported: m2f_model saves to local directories only.")
        directory = Path(save_directory)
        if directory.is_file():
            raise AssertionError(f"Provided path ({directory}) should be a directory, not a file")
        directory.mkdir(parents=True, exist_ok=True)
        config_path = directory / PREPROCESSOR_CONFIG_NAME
        self.to_json_file(config_path)
        return [str(config_path)]

    # ----------------------------------------------------------------------------- preprocessing
    def __call__(self, images: Any, segmentation_maps: Any = None,
                 instance_id_to_semantic_id: Mapping[int, int] | list[Mapping[int, int]] | None = None,
                 **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, segmentation_maps, instance_id_to_semantic_id, **kwargs)

    def preprocess(
        self,
        images: Any,
        segmentation_maps: Any = None,
        instance_id_to_semantic_id: Mapping[int, int] | list[Mapping[int, int]] | None = None,
        *,
        return_tensors: str | None = "pt",
        device: torch.device | str | None = None,
        input_data_format: str | None = None,
        **overrides: Any,
    ) -> BatchFeature:
        """pixel_values (B, 3, H, W) float32, pixel_mask (B, H, W) int64 [, mask_labels, class_labels].

        `images`: a PIL image, numpy array or torch tensor (HWC or CHW; 2-D for grayscale), a 4-D
        batch, or a list. Any constructor parameter may be overridden for this call.
        `segmentation_maps`: one (H, W) map per image (semantic ids, or instance ids together with
        `instance_id_to_semantic_id`, one dict for all images or one per image).
        """
        settings = self._settings(overrides)
        image_list = self._images_to_chw(images, settings, input_data_format, device)
        map_list = None
        if segmentation_maps is not None:
            map_list = [_segmentation_map_to_tensor(m, device) for m in
                        _flat_image_list(segmentation_maps, 2, "segmentation_maps")]
            if len(map_list) != len(image_list):
                raise ValueError(f"got {len(image_list)} images but {len(map_list)} segmentation maps; give one "
                                 f"map per image")
            for index, (image, segmentation_map) in enumerate(zip(image_list, map_list)):
                if tuple(image.shape[-2:]) != tuple(segmentation_map.shape):
                    raise ValueError(f"segmentation map {index} is {tuple(segmentation_map.shape)} but its image "
                                     f"is {tuple(image.shape[-2:])}; they must have the same height and width")
        resized_images, resized_maps = self._resize_all(image_list, map_list, settings)
        return self._normalise_pad_and_encode(resized_images, resized_maps, instance_id_to_semantic_id,
                                              settings, return_tensors)

    def resize_images(self, images: Any, *, device: torch.device | str | None = None,
                      input_data_format: str | None = None, **overrides: Any) -> list[torch.Tensor]:
        """The resize step of `preprocess` alone: each image as a (C, H', W') tensor in its own dtype (uint8
        for 8-bit images), at the size `preprocess` gives it, not rescaled, normalised or padded.

        `preprocess` on the result with `do_resize=False` gives the same pixel_values as `preprocess` on
        `images` (for same-size images; padding aside otherwise): the decode/resize half of the processor can
        run on CPU workers and the rescale/normalise half on the model's device.
        """
        settings = self._settings(overrides)
        resized, _ = self._resize_all(self._images_to_chw(images, settings, input_data_format, device), None,
                                      settings)
        return resized

    @staticmethod
    def _images_to_chw(images: Any, settings: Mapping[str, Any], input_data_format: str | None,
                       device: torch.device | str | None) -> list[torch.Tensor]:
        return [_image_to_chw(image, do_convert_rgb=bool(settings["do_convert_rgb"]),
                              input_data_format=input_data_format, device=device)
                for image in _flat_image_list(images, 3, "images")]

    def encode_inputs(
        self,
        pixel_values_list: Sequence[Any],
        segmentation_maps: Sequence[Any] | None = None,
        instance_id_to_semantic_id: Mapping[int, int] | list[Mapping[int, int]] | None = None,
        ignore_index: int | None = None,
        do_reduce_labels: bool = False,
        return_tensors: str | None = "pt",
        input_data_format: str | None = None,
    ) -> BatchFeature:
        """Pads already-prepared images (no resize, rescale or normalise) and builds the targets.

        Same result as `preprocess` with do_resize/do_rescale/do_normalize off: pixel_values padded
        to the largest image (or `pad_size`), pixel_mask, and mask_labels/class_labels from
        `segmentation_maps` (padded with `ignore_index`).
        """
        settings = self._settings({"do_resize": False, "do_rescale": False, "do_normalize": False,
                                   "ignore_index": ignore_index, "do_reduce_labels": do_reduce_labels})
        image_list = [_image_to_chw(image, do_convert_rgb=False, input_data_format=input_data_format, device=None)
                      for image in _flat_image_list(list(pixel_values_list), 3, "pixel_values_list")]
        map_list = None
        if segmentation_maps is not None:
            map_list = [_segmentation_map_to_tensor(m, None)
                        for m in _flat_image_list(list(segmentation_maps), 2, "segmentation_maps")]
        return self._normalise_pad_and_encode(image_list, map_list, instance_id_to_semantic_id, settings,
                                              return_tensors)

    def _settings(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        names = ("do_resize", "size", "size_divisor", "resample", "do_rescale", "rescale_factor", "do_normalize",
                 "image_mean", "image_std", "ignore_index", "do_reduce_labels", "num_labels", "pad_size",
                 "do_convert_rgb")
        unknown = set(overrides) - set(names) - {"max_size", "disable_grouping", "data_format"}
        if unknown:
            raise TypeError(f"unknown preprocessing argument(s) {sorted(unknown)}; valid: {list(names)}")
        data_format = overrides.get("data_format")
        if data_format is not None and str(getattr(data_format, "value", data_format)) != "channels_first":
            raise ValueError(f"data_format={data_format!r}: pixel_values are always channels-first (B, C, H, W)")
        settings = {name: overrides.get(name, getattr(self, name)) for name in names}
        if overrides.get("size") is not None:
            settings["size"] = _normalise_size(overrides["size"], max_size=overrides.get("max_size"))
        elif overrides.get("max_size") is not None:
            settings["size"] = {**settings["size"], "longest_edge": int(overrides["max_size"])}
        if overrides.get("pad_size") is not None:
            settings["pad_size"] = _normalise_size(overrides["pad_size"], param_name="pad_size")
        settings["resample"] = _resample_id(settings["resample"])
        if settings["size_divisor"] is None:
            settings["size_divisor"] = 0
        if settings["do_rescale"] and settings["rescale_factor"] is None:
            raise ValueError("do_rescale=True needs rescale_factor (e.g. 1/255)")
        if settings["do_normalize"] and (settings["image_mean"] is None or settings["image_std"] is None):
            raise ValueError("do_normalize=True needs image_mean and image_std")
        return settings

    def _resize_all(self, images: list[torch.Tensor], maps: list[torch.Tensor] | None,
                    settings: Mapping[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Resizes each group of same-shape images as one batch (maps with nearest-exact)."""
        if not settings["do_resize"]:
            return images, maps
        groups: dict[tuple, list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault((tuple(image.shape), image.dtype, image.device), []).append(index)
        resized_images: list[torch.Tensor] = [None] * len(images)  # type: ignore[list-item]
        resized_maps: list[torch.Tensor] | None = None if maps is None else [None] * len(maps)  # type: ignore
        for (shape, _, _), indices in groups.items():
            new_size = _output_size(shape[-2], shape[-1], settings["size"], settings["size_divisor"])
            batch = _resize_batch(_stack_same_shape([images[i] for i in indices]), new_size, settings["resample"])
            for position, index in enumerate(indices):
                resized_images[index] = batch[position]
            if maps is not None:
                for index in indices:  # maps may differ in dtype; each is one small nearest-exact resize
                    resized_maps[index] = _resize_batch(maps[index][None, None], new_size, 0)[0, 0]
        return resized_images, resized_maps

    def _normalise_pad_and_encode(self, images: list[torch.Tensor], maps: list[torch.Tensor] | None,
                                  instance_id_to_semantic_id: Any, settings: Mapping[str, Any],
                                  return_tensors: str | None) -> BatchFeature:
        if settings["pad_size"] is not None:
            pad_size = settings["pad_size"]
            if set(pad_size) != {"height", "width"}:
                raise ValueError(f"pad_size must be {{'height': H, 'width': W}}, got {pad_size}")
            padded_height, padded_width = pad_size["height"], pad_size["width"]
        else:
            padded_height = max(image.shape[-2] for image in images)
            padded_width = max(image.shape[-1] for image in images)
        for image in images:
            if image.shape[-2] > padded_height or image.shape[-1] > padded_width:
                raise ValueError(f"an image of {tuple(image.shape[-2:])} does not fit pad_size "
                                 f"{(padded_height, padded_width)}; raise pad_size or resize smaller")
        device = images[0].device
        needs_padding = any(tuple(image.shape[-2:]) != (padded_height, padded_width) for image in images)
        allocate = torch.zeros if needs_padding else torch.empty
        padded = allocate((len(images), images[0].shape[0], padded_height, padded_width),
                          dtype=self._output_dtype(images[0], settings), device=device)  # (B, C, H, W)
        pixel_mask = torch.zeros((len(images), padded_height, padded_width), dtype=torch.int64,
                                 device=device)  # (B, H, W)
        for index, image in enumerate(images):
            height, width = image.shape[-2:]
            self._normalise_into(image, padded[index, :, :height, :width], settings)
            pixel_mask[index, :height, :width] = 1
        encoded = BatchFeature()
        if return_tensors == "pt":
            encoded["pixel_values"], encoded["pixel_mask"] = padded, pixel_mask
        elif return_tensors == "np":
            encoded["pixel_values"], encoded["pixel_mask"] = padded.cpu().numpy(), pixel_mask.cpu().numpy()
        elif return_tensors is None:
            encoded["pixel_values"], encoded["pixel_mask"] = list(padded), list(pixel_mask)
        else:
            raise ValueError(f"return_tensors={return_tensors!r}; use 'pt', 'np' or None")
        if maps is not None:
            mask_labels, class_labels = [], []
            fill = settings["ignore_index"] if settings["ignore_index"] is not None else 0
            for index, segmentation_map in enumerate(maps):
                mapping = (instance_id_to_semantic_id[index] if isinstance(instance_id_to_semantic_id, list)
                           else instance_id_to_semantic_id)
                masks, labels = segmentation_map_to_binary_masks(
                    segmentation_map, mapping, ignore_index=settings["ignore_index"],
                    do_reduce_labels=settings["do_reduce_labels"])
                padded_masks = torch.full((masks.shape[0], padded_height, padded_width), float(fill),
                                          dtype=torch.float32, device=masks.device)  # (N, H, W)
                padded_masks[:, :masks.shape[1], :masks.shape[2]] = masks
                mask_labels.append(padded_masks)
                class_labels.append(labels)
            encoded["mask_labels"], encoded["class_labels"] = mask_labels, class_labels
        return encoded

    @staticmethod
    def _output_dtype(image: torch.Tensor, settings: Mapping[str, Any]) -> torch.dtype:
        if settings["do_normalize"]:
            return torch.float32
        if settings["do_rescale"]:
            return torch.result_type(image, settings["rescale_factor"])
        return image.dtype

    @staticmethod
    def _normalise_into(image: torch.Tensor, out: torch.Tensor, settings: Mapping[str, Any]) -> None:
        """Writes the rescaled/normalised image into `out` (a view of the padded batch): one pass, no temporaries.

        Rescale and normalise are fused as (x - mean/factor) / (std/factor), like the reference.
        """
        if settings["do_normalize"]:
            mean, std = settings["image_mean"], settings["image_std"]
            if settings["do_rescale"]:
                scale = 1.0 / settings["rescale_factor"]
                mean = torch.tensor(mean, device=image.device) * scale
                std = torch.tensor(std, device=image.device) * scale
            mean = torch.as_tensor(mean, dtype=torch.float32, device=image.device).reshape(-1, 1, 1)
            std = torch.as_tensor(std, dtype=torch.float32, device=image.device).reshape(-1, 1, 1)
            # Cast first, then subtract in place: the same float32 values as a mixed uint8/float32 `sub`,
            # at about 3/4 of its CPU time.
            out.copy_(image)
            out.sub_(mean)
            out.div_(std)
        elif settings["do_rescale"]:
            torch.mul(image, settings["rescale_factor"], out=out)
        else:
            out.copy_(image)

    # ----------------------------------------------------------------------------- post-processing
    def post_process_semantic_segmentation(self, outputs: Any, target_sizes: Sequence[tuple[int, int]] | None = None,
                                           return_segmentation_scores: bool = False,
                                           **options: Any) -> list:
        """A (H, W) int64 class map per image; see `post_processing.post_process_semantic_segmentation`."""
        return post_processing.post_process_semantic_segmentation(
            outputs, target_sizes, return_segmentation_scores=return_segmentation_scores, **options)

    def post_process_instance_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        target_sizes: Sequence[tuple[int, int]] | None = None,
        return_coco_annotation: bool | None = False,
        return_binary_maps: bool | None = False,
        **options: Any,
    ) -> list[dict]:
        """{"segmentation", "segments_info"} per image; see `post_processing.post_process_instance_segmentation`."""
        return post_processing.post_process_instance_segmentation(
            outputs, threshold, mask_threshold, overlap_mask_area_threshold, target_sizes,
            return_coco_annotation, return_binary_maps, **options)

    def post_process_panoptic_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: set[int] | None = None,
        target_sizes: Sequence[tuple[int, int]] | None = None,
        **options: Any,
    ) -> list[dict]:
        """{"segmentation", "segments_info"} per image; see `post_processing.post_process_panoptic_segmentation`."""
        return post_processing.post_process_panoptic_segmentation(
            outputs, threshold, mask_threshold, overlap_mask_area_threshold, label_ids_to_fuse, target_sizes,
            **options)

    def copy(self) -> "Mask2FormerImageProcessor":
        return copy.deepcopy(self)
