"""The labeling pipeline: Ray Data stages that turn a bucket of images into Parquet tables of COCO-RLE segments.

`run_segmentation(SegmentationOptions(...)) -> report dict` runs the whole job; `jobs/segment_bucket.py` is its CLI.
"""
from pipeline.segment_job import OutputNotEmptyError, SegmentationOptions, run_segmentation

__all__ = ["SegmentationOptions", "OutputNotEmptyError", "run_segmentation"]
