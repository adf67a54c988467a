"""Fine-tuning support: training datasets (COCO instance / panoptic, semantic label maps), augmentation,
batching, and (in sibling modules) metrics and the synthetic shapes dataset."""
from training.augmentation import ScaleCropFlip
from training.coco_categories import CocoCategories
from training.coco_instances import CocoInstanceDataset
from training.coco_panoptic import CocoPanopticDataset
from training.collate import collate_segmentation_batch
from training.loading import load_coco_dataset, load_semantic_dataset
from training.segmentation_dataset import SegmentationDataset, SkippedRecords
from training.semantic_maps import SemanticMapDataset

__all__ = ["ScaleCropFlip", "CocoCategories", "CocoInstanceDataset", "CocoPanopticDataset", "SemanticMapDataset",
           "SegmentationDataset", "SkippedRecords", "collate_segmentation_batch", "load_coco_dataset",
           "load_semantic_dataset"]
