"""Semantic label PNGs (ADE20K style: one class id per pixel) as a training dataset.

Images and label maps are paired by file stem (`images/x.jpg` <-> `annotations/x.png`). With `reduce_labels`
(ADE20K's convention) label 0 means "other" and becomes unlabeled, and every other label k becomes k - 1.
Each class present in an image becomes one target mask.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.augmentation import ScaleCropFlip
from training.segmentation_dataset import LoadedExample, SegmentationDataset
from training.storage import DatasetLocation

__all__ = ["SemanticMapDataset"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True, slots=True)
class _SemanticPair:
    image_name: str
    label_name: str


class SemanticMapDataset(SegmentationDataset):
    """Semantic segmentation from images under `image_folder` and label PNGs under `label_folder`.

    `id2label` names the classes 0..L-1 as they read after `reduce_labels`. Label values outside 0..L-1 (other
    than the processor's ignore_index) are unknown classes: left unlabeled and counted in `self.skipped`, or
    raising with on_bad_annotation="raise". Images without a label map and label maps without an image are
    counted there too.
    """

    def __init__(self, location: DatasetLocation, image_folder: str, label_folder: str, *,
                 id2label: dict[int, str], processor: Any, reduce_labels: bool | None = None,
                 augmentation: ScaleCropFlip | None = None, on_bad_annotation: str = "skip") -> None:
        super().__init__(processor=processor, augmentation=augmentation, on_bad_annotation=on_bad_annotation)
        self.location = location
        self.image_folder = image_folder
        self.label_folder = label_folder
        self.id2label = {int(label): str(name) for label, name in id2label.items()}
        if sorted(self.id2label) != list(range(len(self.id2label))):
            raise ValueError(f"id2label must name the contiguous labels 0..L-1, got keys {sorted(self.id2label)}.")
        if self.num_labels > self.ignore_index:
            raise ValueError(f"{self.num_labels} labels include the processor's ignore_index {self.ignore_index}, "
                             f"which marks unlabeled pixels; build the processor with a larger ignore_index.")
        # A processor configured to reduce labels (e.g. an ADE20K checkpoint's) says how its maps are meant.
        self.reduce_labels = bool(getattr(processor, "do_reduce_labels", False)) if reduce_labels is None \
            else reduce_labels

        images = _by_stem(location.files_under(location.path(image_folder)), IMAGE_SUFFIXES)
        labels = _by_stem(location.files_under(location.path(label_folder)), (".png",))
        if not images:
            raise FileNotFoundError(f"No images under {location.describe(location.path(image_folder))}; see "
                                    f"training.load_semantic_dataset's docstring for the expected layout.")
        for stem in sorted(set(labels) - set(images)):
            self.skipped.add("label map without an image", location.describe(location.path(label_folder,
                                                                                            labels[stem])))
        self.examples: list[_SemanticPair] = []
        for stem in sorted(images):
            if stem in labels:
                self.examples.append(_SemanticPair(image_name=images[stem], label_name=labels[stem]))
            else:
                self.skipped.add("missing label map", f"{location.describe(location.path(image_folder, images[stem]))}"
                                 f" has no {stem}.png under {location.describe(location.path(label_folder))}")

    def __len__(self) -> int:
        return len(self.examples)

    def load_example(self, index: int) -> LoadedExample:
        pair = self.examples[index]
        image_path = self.location.path(self.image_folder, pair.image_name)
        label_path = self.location.path(self.label_folder, pair.label_name)
        image = self.location.read_image(image_path, mode="RGB")
        labels = self.location.read_image(label_path, mode="I")
        if labels.ndim != 2:
            raise ValueError(f"{self.location.describe(label_path)} has {labels.shape[-1]} channels; a semantic "
                             f"label map holds one class id per pixel (a grayscale or palette PNG).")
        if labels.shape != image.shape[:2]:
            raise ValueError(f"{self.location.describe(label_path)} is {labels.shape[1]}x{labels.shape[0]} (WxH) "
                             f"but its image {pair.image_name} is {image.shape[1]}x{image.shape[0]}.")

        labels = labels.astype(np.int32)
        unlabeled = labels == self.ignore_index
        if self.reduce_labels:
            unlabeled |= labels == 0
            labels = labels - 1
        unknown = ~unlabeled & ((labels < 0) | (labels >= self.num_labels))
        if unknown.any():
            values = np.unique(labels[unknown] + (1 if self.reduce_labels else 0)).tolist()
            self.skipped.add("unknown label values", f"{self.location.describe(label_path)} holds values "
                             f"{values[:8]} outside the {self.num_labels} labels of id2label")
            unlabeled |= unknown
        segment_map = np.where(unlabeled, self.ignore_index, labels).astype(np.int32)
        return LoadedExample(image=image, segment_map=segment_map, segment_labels=None, image_id=index,
                             source=self.location.describe(image_path))


def _by_stem(relative_paths: set[str], suffixes: tuple[str, ...]) -> dict[str, str]:
    """{stem (with sub-folders): relative path} for files with one of `suffixes` (case-insensitive)."""
    found = {}
    for path in sorted(relative_paths):
        stem, suffix = posixpath.splitext(path)
        if suffix.lower() in suffixes:
            found[stem] = path
    return found
