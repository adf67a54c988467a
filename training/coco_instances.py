"""COCO instance annotations (polygons, compressed RLE, uncompressed RLE) as a training dataset.

Each image becomes one segment-id map: annotations are painted largest first, so where instances overlap the
smaller one stays visible. Crowd annotations are left out of the targets (their pixels count as unlabeled).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from training.augmentation import ScaleCropFlip
from training.segmentation_dataset import CocoFileDataset, LoadedExample, segment_ids_avoiding
from training.storage import DatasetLocation

__all__ = ["CocoInstanceDataset", "segmentation_to_rle"]


@dataclass(frozen=True, slots=True)
class _InstanceSegment:
    annotation_id: Any
    label: int
    rle: dict  # compressed COCO RLE {"size": [H, W], "counts": bytes}
    area: int


@dataclass(frozen=True, slots=True)
class _InstanceImage:
    image_id: int
    file_name: str
    height: int
    width: int
    segments: tuple[_InstanceSegment, ...]  # largest first


def segmentation_to_rle(segmentation: Any, height: int, width: int, *, check_decodes: bool = True) -> dict:
    """A COCO `segmentation` (polygon list, uncompressed RLE or compressed RLE) as compressed RLE.

    Raises ValueError saying what is wrong with it.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError("the polygon list is empty")
        for polygon in segmentation:
            if (not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2
                    or not all(isinstance(value, (int, float)) for value in polygon)):
                raise ValueError("each polygon must be a flat list [x1, y1, x2, y2, ...] of at least 3 points; "
                                 f"got {str(polygon)[:80]}")
        if not all(np.isfinite(value) for polygon in segmentation for value in polygon):
            raise ValueError("a polygon holds a non-finite coordinate")
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ValueError(f"expected a polygon list or an RLE dict with 'size' and 'counts', got "
                         f"{str(segmentation)[:80]}")
    if list(segmentation["size"]) != [height, width]:
        raise ValueError(f"the RLE size {segmentation['size']} differs from the image's [height, width] "
                         f"[{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if not all(isinstance(run, int) and run >= 0 for run in counts) or sum(counts) != height * width:
            raise ValueError(f"uncompressed RLE counts must be non-negative integers summing to height*width = "
                             f"{height * width}")
        return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(counts, (str, bytes)):
        rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        if check_decodes:
            try:
                mask_utils.decode(rle)
            except (ValueError, TypeError) as error:
                raise ValueError(f"the compressed RLE does not decode: {error}") from error
        return rle
    raise ValueError(f"RLE counts must be a list of run lengths or a compressed string, got {type(counts).__name__}")


class CocoInstanceDataset(CocoFileDataset):
    """COCO instance segmentation: `annotation_path` (instances_*.json) and images under `image_folder`, both
    relative to `location`.

    Bad records are left out and counted in `self.skipped` (or raise, with on_bad_annotation="raise"):
    images whose file is missing, annotations of unknown images or categories, malformed or empty masks.
    Crowd annotations are counted there too, but as left out by design rather than bad.
    """

    def __init__(self, location: DatasetLocation, annotation_path: str, image_folder: str, *, processor: Any,
                 augmentation: ScaleCropFlip | None = None, on_bad_annotation: str = "skip",
                 check_masks_decode: bool = True) -> None:
        super().__init__(location, annotation_path, image_folder, kind="instances", processor=processor,
                         augmentation=augmentation, on_bad_annotation=on_bad_annotation)
        self.check_masks_decode = check_masks_decode
        available = location.files_under(location.path(image_folder))
        images = {entry["id"]: entry for entry in self.well_formed_images()
                  if self.has_file(entry, available, folder=image_folder, file_name=entry["file_name"],
                                   what="image file")}
        listed_image_ids = {entry.get("id") for entry in self.coco_file["images"] if isinstance(entry, dict)}
        segments: dict[int, list[_InstanceSegment]] = {image_id: [] for image_id in images}
        for annotation in self.coco_file["annotations"]:
            image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
            if image_id in images:
                segment = self._segment(annotation, images[image_id])
                if segment is not None:
                    segments[image_id].append(segment)
            elif image_id not in listed_image_ids:
                self.skipped.add("annotation of an unknown image",
                                 f"annotation {_annotation_name(annotation)} has image_id {image_id!r}, which "
                                 f"{self.annotation_source} does not list")
        self.examples = [
            _InstanceImage(image_id=image_id, file_name=entry["file_name"], height=entry["height"],
                           width=entry["width"],
                           segments=tuple(sorted(segments[image_id], key=lambda segment: -segment.area)))
            for image_id, entry in images.items()
        ]

    def load_example(self, index: int) -> LoadedExample:
        record = self.examples[index]
        image_path = self.location.path(self.image_folder, record.file_name)
        image = self.read_sized_image(image_path, record, mode="RGB", what="image")
        segment_map = np.full((record.height, record.width), self.ignore_index, dtype=np.int32)
        segment_ids = segment_ids_avoiding(len(record.segments), self.ignore_index)
        for segment_id, segment in zip(segment_ids, record.segments):
            segment_map[mask_utils.decode(segment.rle).astype(bool)] = segment_id
        segment_labels = {segment_id: segment.label for segment_id, segment in zip(segment_ids, record.segments)}
        return LoadedExample(image=image, segment_map=segment_map, segment_labels=segment_labels,
                             image_id=record.image_id, source=self.location.describe(image_path))

    def _segment(self, annotation: dict, image: dict) -> _InstanceSegment | None:
        name = f"annotation {_annotation_name(annotation)} of {image['file_name']}"
        label = self.categories.label_of(annotation.get("category_id"))
        if label is None:
            self.skipped.add("unknown category id", f"{name} has category_id {annotation.get('category_id')!r}, "
                             f"not among {self.annotation_source}'s categories {self.category_ids}")
            return None
        if annotation.get("iscrowd", 0):
            self.skipped.add("crowd annotation (left out of targets)", name, bad=False)
            return None
        try:
            rle = segmentation_to_rle(annotation.get("segmentation"), image["height"], image["width"],
                                      check_decodes=self.check_masks_decode)
        except ValueError as error:
            self.skipped.add("malformed segmentation", f"{name}: {error}")
            return None
        area = int(mask_utils.area(rle))
        if area == 0:
            self.skipped.add("empty mask", f"{name} covers no pixel")
            return None
        return _InstanceSegment(annotation_id=annotation.get("id"), label=label, rle=rle, area=area)


def _annotation_name(annotation: Any) -> str:
    return repr(annotation.get("id")) if isinstance(annotation, dict) else repr(annotation)[:40]
