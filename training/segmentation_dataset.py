"""The torch Dataset shared by every annotation format: decode -> augment -> image processor -> training item.

A format (COCO instances, COCO panoptic, semantic label maps) only has to turn example `index` into an image,
a segment-id map and the class of each segment id. Everything after that is common:

    image (H, W, 3) uint8, segment_map (H, W) int32  --augmentation-->  same, transformed together
    --processor(images, segmentation_maps, instance_id_to_semantic_id)-->  {"pixel_values": (3, H', W') float,
    "pixel_mask": (H', W') int64, "mask_labels": (N, H', W') float, "class_labels": (N,) int64, "image_id": int}

Pixels that belong to no training segment (unlabeled, crowd, unknown category) hold `processor.ignore_index`
in the segment map, which the processor leaves out of the targets; segment ids therefore skip that value.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from training.augmentation import ScaleCropFlip
from training.coco_categories import CocoCategories
from training.storage import DatasetLocation

__all__ = ["SegmentationDataset", "CocoFileDataset", "SkippedRecords", "LoadedExample", "BAD_ANNOTATION_POLICIES",
           "segment_ids_avoiding"]

BAD_ANNOTATION_POLICIES = ("skip", "raise")


class SkippedRecords:
    """What a dataset left out, counted by reason, with the first few concrete cases of each.

    `str(dataset.skipped)` is a one-paragraph summary. Records found while building the dataset are complete;
    ones found while loading items (e.g. a listed segment absent from its PNG) are counted in the process that
    loaded them, so DataLoader worker processes keep their own counts.
    """

    examples_per_reason = 3

    def __init__(self, *, raise_on_bad: bool = False) -> None:
        self.raise_on_bad = raise_on_bad
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, detail: str, *, bad: bool = True) -> None:
        """Records one left-out item; with on_bad_annotation="raise", a bad one raises instead."""
        if bad and self.raise_on_bad:
            raise ValueError(f"{reason}: {detail}. Fix the annotation, or build the dataset with "
                             f"on_bad_annotation='skip' to leave such records out and count them.")
        self.counts[reason] += 1
        cases = self.examples.setdefault(reason, [])
        if len(cases) < self.examples_per_reason:
            cases.append(detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return self.total > 0

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self.counts.items())

    def summary(self) -> str:
        if not self.counts:
            return "nothing skipped"
        parts = [f"{count} x {reason} (e.g. {'; '.join(self.examples[reason])})"
                 for reason, count in sorted(self.counts.items())]
        return "skipped " + ", ".join(parts)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"SkippedRecords({dict(self.counts)})"


@dataclass
class LoadedExample:
    """One decoded example before augmentation: the image and its segments as an id map."""

    image: np.ndarray  # (H, W, 3) uint8
    segment_map: np.ndarray  # (H, W) int32, ignore_index where no segment
    segment_labels: dict[int, int] | None  # segment id -> contiguous label id; None: the map holds label ids
    image_id: int
    source: str = ""  # the image's path, for error messages
    extra: dict[str, Any] = field(default_factory=dict)


def segment_ids_avoiding(count: int, reserved: int) -> list[int]:
    """`count` small distinct ids 0, 1, 2, ... that skip `reserved` (the processor's ignore_index)."""
    ids = list(range(count + 1))
    if reserved in ids:
        ids.remove(reserved)
    return ids[:count]


class SegmentationDataset(Dataset):
    """Base class: subclasses fill `self.id2label` and implement `__len__` and `load_example(index)`."""

    def __init__(self, *, processor: Any, augmentation: ScaleCropFlip | None = None,
                 on_bad_annotation: str = "skip") -> None:
        if on_bad_annotation not in BAD_ANNOTATION_POLICIES:
            raise ValueError(f"on_bad_annotation={on_bad_annotation!r}; use one of {BAD_ANNOTATION_POLICIES}.")
        ignore_index = getattr(processor, "ignore_index", None)
        if ignore_index is None:
            raise ValueError("The image processor has ignore_index=None, but the dataset marks unlabeled pixels "
                             "with it; build the processor with ignore_index=255.")
        self.ignore_index = int(ignore_index)
        self.processor = _without_label_reduction(processor)
        self.augmentation = augmentation
        self.skipped = SkippedRecords(raise_on_bad=on_bad_annotation == "raise")
        self.epoch = 0
        self.id2label: dict[int, str] = {}

    @property
    def label2id(self) -> dict[str, int]:
        return {name: label for label, name in self.id2label.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def set_epoch(self, epoch: int) -> None:
        """Selects the augmentation draws of `epoch` (the same epoch and index always give the same sample)."""
        self.epoch = epoch

    def load_example(self, index: int) -> LoadedExample:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.load_example(index)
        image, segment_map = example.image, example.segment_map
        if self.augmentation is not None:
            image, segment_map = self.augmentation(image, segment_map, epoch=self.epoch, index=index)
        encoded = self.processor(images=[image], segmentation_maps=[segment_map],
                                 instance_id_to_semantic_id=example.segment_labels, return_tensors="pt")
        mask_labels = torch.as_tensor(encoded["mask_labels"][0])
        # A processor that pads fills the pad with ignore_index inside the binary masks; there it is background.
        mask_labels = (mask_labels == 1).to(torch.float32)  # (N, H', W')
        return {
            "pixel_values": torch.as_tensor(encoded["pixel_values"][0], dtype=torch.float32),  # (3, H', W')
            "pixel_mask": torch.as_tensor(encoded["pixel_mask"][0], dtype=torch.int64),  # (H', W')
            "mask_labels": mask_labels,
            "class_labels": torch.as_tensor(encoded["class_labels"][0], dtype=torch.int64),  # (N,)
            "image_id": example.image_id,
        }


class CocoFileDataset(SegmentationDataset):
    """Base class of the COCO formats (instances, panoptic): one JSON file with images, annotations and
    categories, and images under `image_folder`, both relative to `location`. Subclasses fill `self.examples`
    (records with image_id, file_name, height, width) and implement `load_example`."""

    def __init__(self, location: DatasetLocation, annotation_path: str, image_folder: str, *, kind: str,
                 processor: Any, augmentation: ScaleCropFlip | None = None, on_bad_annotation: str = "skip") -> None:
        super().__init__(processor=processor, augmentation=augmentation, on_bad_annotation=on_bad_annotation)
        self.location = location
        self.image_folder = image_folder
        self.annotation_source = location.describe(location.path(annotation_path))
        self.coco_file = location.read_json(location.path(annotation_path))
        for key in ("images", "annotations", "categories"):
            if not isinstance(self.coco_file, dict) or not isinstance(self.coco_file.get(key), list):
                raise ValueError(f"{self.annotation_source} lacks the '{key}' list of a COCO {kind} file.")
        self.categories = CocoCategories.from_coco(self.coco_file["categories"], source=self.annotation_source,
                                                   things_by_default=True)
        self.id2label = self.categories.id2label
        self.category_ids = list(self.categories.category_ids)
        self.examples: list = []

    def __len__(self) -> int:
        return len(self.examples)

    def well_formed_images(self) -> Iterator[dict]:
        """The file's image records that have an integer id, a file_name and a positive size; the rest are
        skipped and counted."""
        for entry in self.coco_file["images"]:
            if (isinstance(entry, dict) and isinstance(entry.get("id"), int) and isinstance(entry.get("file_name"), str)
                    and all(isinstance(entry.get(side), int) and entry[side] > 0 for side in ("height", "width"))):
                yield entry
            else:
                self.skipped.add("malformed image record",
                                 f"{str(entry)[:80]} in {self.annotation_source} needs an integer id, a file_name "
                                 f"and positive integer height and width")

    def has_file(self, entry: dict, available: set[str], *, folder: str, file_name: str, what: str) -> bool:
        """True if `file_name` is among the `available` files of `folder`; else the image is skipped as missing
        its `what` ("image file", "panoptic PNG")."""
        if file_name in available:
            return True
        path = self.location.describe(self.location.path(folder, file_name))
        self.skipped.add(f"missing {what}", f"{path} (image id {entry['id']})")
        return False

    def read_sized_image(self, path: str, record: Any, *, mode: str, what: str) -> np.ndarray:
        """The image at `path`, checked to have the record's height and width."""
        pixels = self.location.read_image(path, mode=mode)
        if pixels.shape[:2] != (record.height, record.width):
            raise ValueError(f"{self.location.describe(path)} is {pixels.shape[1]}x{pixels.shape[0]} (WxH) but "
                             f"{self.annotation_source} gives image {record.image_id} as "
                             f"{record.width}x{record.height}; fix its width/height record or the {what}.")
        return pixels


def _without_label_reduction(processor: Any) -> Any:
    """The datasets hand the processor finished segment maps; a processor set to reduce labels would shift them
    again, so a copy with reduction switched off is used (semantic datasets apply reduce_labels themselves)."""
    if not getattr(processor, "do_reduce_labels", False):
        return processor
    processor = copy.copy(processor)
    processor.do_reduce_labels = False
    return processor
