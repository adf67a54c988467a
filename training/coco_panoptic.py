"""COCO panoptic annotations (segment PNGs + segments_info) as a training dataset.

A panoptic PNG stores segment ids as colours, id = R + 256 G + 256^2 B, 0 = unlabeled; `segments_info` gives
each id its category. Things and stuff both become targets; crowd segments are left out (unlabeled).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from training.augmentation import ScaleCropFlip
from training.segmentation_dataset import CocoFileDataset, LoadedExample, segment_ids_avoiding
from training.storage import DatasetLocation

__all__ = ["CocoPanopticDataset", "panoptic_png_to_ids"]


def panoptic_png_to_ids(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 panoptic PNG -> (H, W) int64 segment ids, id = R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


@dataclass(frozen=True, slots=True)
class _PanopticSegment:
    png_id: int
    label: int


@dataclass(frozen=True, slots=True)
class _PanopticImage:
    image_id: int
    file_name: str
    png_name: str
    height: int
    width: int
    segments: tuple[_PanopticSegment, ...]
    left_out_png_ids: frozenset[int]  # listed, but not a target (crowd, unknown category, ...)


class CocoPanopticDataset(CocoFileDataset):
    """COCO panoptic: `annotation_path` (panoptic_*.json), PNGs under `png_folder`, images under `image_folder`
    (all relative to `location`).

    Left out and counted in `self.skipped` (or raising, with on_bad_annotation="raise"): images whose image file
    or PNG is missing, images without a panoptic annotation, segments of unknown categories, segments with zero
    area, and, found while loading, segments listed but absent from their PNG and PNG ids that no segment lists.
    """

    def __init__(self, location: DatasetLocation, annotation_path: str, png_folder: str, image_folder: str, *,
                 processor: Any, augmentation: ScaleCropFlip | None = None,
                 on_bad_annotation: str = "skip") -> None:
        super().__init__(location, annotation_path, image_folder, kind="panoptic", processor=processor,
                         augmentation=augmentation, on_bad_annotation=on_bad_annotation)
        self.png_folder = png_folder
        annotations_by_image: dict[Any, dict] = {}
        for annotation in self.coco_file["annotations"]:
            if (not isinstance(annotation, dict) or not isinstance(annotation.get("file_name"), str)
                    or not isinstance(annotation.get("segments_info"), list)):
                self.skipped.add("malformed panoptic annotation",
                                 f"{str(annotation)[:80]} in {self.annotation_source} needs image_id, file_name "
                                 f"and a segments_info list")
                continue
            annotations_by_image[annotation.get("image_id")] = annotation

        available_images = location.files_under(location.path(image_folder))
        available_pngs = location.files_under(location.path(png_folder))
        for entry in self.well_formed_images():
            annotation = annotations_by_image.get(entry["id"])
            if annotation is None:
                self.skipped.add("image without a panoptic annotation",
                                 f"image {entry['id']} ({entry['file_name']}) in {self.annotation_source}")
            elif (self.has_file(entry, available_images, folder=image_folder, file_name=entry["file_name"],
                                what="image file")
                  and self.has_file(entry, available_pngs, folder=png_folder, file_name=annotation["file_name"],
                                    what="panoptic PNG")):
                segments, left_out = self._segments(annotation["segments_info"], annotation["file_name"])
                self.examples.append(_PanopticImage(
                    image_id=entry["id"], file_name=entry["file_name"], png_name=annotation["file_name"],
                    height=entry["height"], width=entry["width"], segments=segments, left_out_png_ids=left_out))

    def load_example(self, index: int) -> LoadedExample:
        record = self.examples[index]
        image_path = self.location.path(self.image_folder, record.file_name)
        image = self.read_sized_image(image_path, record, mode="RGB", what="image")
        png_ids = panoptic_png_to_ids(self.read_sized_image(self.location.path(self.png_folder, record.png_name),
                                                            record, mode="RGB", what="panoptic PNG"))  # (H, W)

        segment_map = np.full(png_ids.shape, self.ignore_index, dtype=np.int32)
        segment_labels: dict[int, int] = {}
        listed = {segment.png_id for segment in record.segments} | record.left_out_png_ids
        for segment_id, segment in zip(segment_ids_avoiding(len(record.segments), self.ignore_index),
                                       record.segments):
            pixels = png_ids == segment.png_id
            if not pixels.any():
                self.skipped.add("empty mask", f"segment {segment.png_id} of {record.png_name} has no pixel in "
                                 f"the PNG")
                continue
            segment_map[pixels] = segment_id
            segment_labels[segment_id] = segment.label
        uncovered = (segment_map == self.ignore_index) & (png_ids != 0)
        unlisted = sorted(set(np.unique(png_ids[uncovered]).tolist()) - listed) if uncovered.any() else []
        if unlisted:
            self.skipped.add("PNG id without a segment", f"ids {unlisted[:5]} in {record.png_name} are not in "
                             f"its segments_info; left unlabeled", bad=False)
        return LoadedExample(image=image, segment_map=segment_map, segment_labels=segment_labels,
                             image_id=record.image_id, source=self.location.describe(image_path))

    def _segments(self, segments_info: list, png_name: str
                  ) -> tuple[tuple[_PanopticSegment, ...], frozenset[int]]:
        segments, left_out = [], set()
        for info in segments_info:
            name = f"segment {info.get('id') if isinstance(info, dict) else info!r} of {png_name}"
            if not isinstance(info, dict) or not isinstance(info.get("id"), int) or info["id"] <= 0:
                self.skipped.add("malformed segment", f"{name}: needs a positive integer id")
                continue
            left_out.add(info["id"])
            label = self.categories.label_of(info.get("category_id"))
            if label is None:
                self.skipped.add("unknown category id", f"{name} has category_id {info.get('category_id')!r}, not "
                                 f"among {self.annotation_source}'s categories {self.category_ids}")
            elif info.get("iscrowd", 0):
                self.skipped.add("crowd annotation (left out of targets)", name, bad=False)
            elif info.get("area", 1) == 0:
                self.skipped.add("empty mask", f"{name} has area 0")
            else:
                left_out.discard(info["id"])
                segments.append(_PanopticSegment(png_id=info["id"], label=label))
        return tuple(segments), frozenset(left_out)
