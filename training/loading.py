"""Entry points that build a training dataset from a dataset root (local folder or s3://...)."""
from __future__ import annotations

from typing import Any

from pipeline.storage import StorageConfig
from training.augmentation import ScaleCropFlip
from training.coco_instances import CocoInstanceDataset
from training.coco_panoptic import CocoPanopticDataset
from training.semantic_maps import SemanticMapDataset
from training.storage import open_location

__all__ = ["load_coco_dataset", "load_semantic_dataset", "COCO_TASKS"]

COCO_TASKS = ("panoptic", "instance")


def load_coco_dataset(root_or_uri: str, split: str, *, processor: Any, augmentation: ScaleCropFlip | None = None,
                      task: str = "panoptic", storage_options: StorageConfig | dict[str, Any] | None = None,
                      image_folder: str | None = None, on_bad_annotation: str = "skip"
                      ) -> CocoPanopticDataset | CocoInstanceDataset:
    """A COCO-format split as a torch Dataset of training items (see `SegmentationDataset`).

    Expected layout under `root_or_uri` (the standard COCO one; `jobs/make_shapes_dataset.py` writes it):

        {root}/{split}/<image files>                          images (`image_folder` overrides "{split}")
        {root}/annotations/instances_{split}.json             task="instance"
        {root}/annotations/panoptic_{split}.json              task="panoptic"
        {root}/annotations/panoptic_{split}/<png files>       task="panoptic": segment ids R + 256 G + 256^2 B

    Labels: the file's categories sorted by COCO id become labels 0..L-1 (`dataset.id2label`,
    `dataset.label2id`, `dataset.category_ids[label]` = COCO id, `dataset.categories.thing_label_ids`).
    Bad records are skipped and counted in `dataset.skipped` (on_bad_annotation="raise": raise on the first).
    `storage_options`: a resolved `pipeline.storage.StorageConfig`, or --storage-options (e.g. {"key": ...,
    "secret": ..., "endpoint_url": ...}) resolved over the AWS_* variables.
    """
    location = open_location(root_or_uri, storage_options)
    image_folder = image_folder if image_folder is not None else split
    if task == "panoptic":
        return CocoPanopticDataset(location, f"annotations/panoptic_{split}.json",
                                   f"annotations/panoptic_{split}", image_folder,
                                   processor=processor, augmentation=augmentation,
                                   on_bad_annotation=on_bad_annotation)
    if task == "instance":
        return CocoInstanceDataset(location, f"annotations/instances_{split}.json", image_folder,
                                   processor=processor, augmentation=augmentation,
                                   on_bad_annotation=on_bad_annotation)
    raise ValueError(f"task={task!r} is not a COCO annotation kind; use one of {COCO_TASKS}.")


def load_semantic_dataset(root_or_uri: str, split: str, *, processor: Any, id2label: dict[int, str],
                          reduce_labels: bool | None = None, augmentation: ScaleCropFlip | None = None,
                          storage_options: StorageConfig | dict[str, Any] | None = None, image_folder: str | None = None,
                          label_folder: str | None = None, on_bad_annotation: str = "skip") -> SemanticMapDataset:
    """Semantic label maps as a torch Dataset of training items; ADE20K's layout by default:

        {root}/images/{split}/<name>.jpg         images (`image_folder` overrides "images/{split}")
        {root}/annotations/{split}/<name>.png    one class id per pixel (`label_folder` overrides it)

    `reduce_labels` (ADE20K: True; default: the processor's do_reduce_labels) turns 0 into unlabeled and k into
    k - 1; `id2label` names the labels after that.
    """
    location = open_location(root_or_uri, storage_options)
    return SemanticMapDataset(
        location, image_folder if image_folder is not None else f"images/{split}",
        label_folder if label_folder is not None else f"annotations/{split}", id2label=id2label,
        processor=processor, reduce_labels=reduce_labels, augmentation=augmentation,
        on_bad_annotation=on_bad_annotation)
