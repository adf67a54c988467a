"""Command-line flags shared by the jobs (segment_bucket, evaluate, export_coco, finetune): one name and one
meaning per flag, parsed into typed values once (tuples, floats in range, a dict of storage options).

The post-processing flags mean what transformers' Mask2Former post-processors do with them, per task:

    flag                 panoptic                                   instance          semantic
    --threshold          min query score of a segment               min score         -
    --mask-threshold     mask probability a pixel counts from       no effect (*)     -
    --overlap-threshold  min visible fraction of a segment's mask   no effect (*)     -
    --label-ids-to-fuse  labels merged into one segment per image   -                 -

(*) transformers' instance post-processing binarises every mask at logit > 0 (probability 0.5) and keeps
overlapping instances whole; the job keeps that behaviour so its numbers match transformers'.
"""
from __future__ import annotations

import argparse
import json

from pipeline.records import TASKS

__all__ = ["InvalidOptionError", "POSTPROCESS_DEFAULTS", "add_postprocess_arguments", "add_storage_argument", "tasks_argument",
           "label_ids_argument", "probability_argument", "storage_options_argument"]

class InvalidOptionError(argparse.ArgumentTypeError, ValueError):
    """A flag's value cannot be used; argparse prints the message as is, Python callers can catch ValueError."""


POSTPROCESS_DEFAULTS = {"threshold": 0.5, "mask_threshold": 0.5, "overlap_threshold": 0.8}


def tasks_argument(text: str) -> tuple[str, ...]:
    """'panoptic, semantic' -> ('panoptic', 'semantic'); unknown or no tasks are refused."""
    tasks = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise InvalidOptionError(f"{text!r}: choose one or more of {','.join(TASKS)}")
    return tasks


def label_ids_argument(text: str) -> tuple[int, ...]:
    """'3,4' -> (3, 4); '' -> ()."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InvalidOptionError(f"{text!r}: give label ids as integers separated by commas, e.g. 3,4") \
            from None


def probability_argument(text: str) -> float:
    """A float in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise InvalidOptionError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise InvalidOptionError(f"{text} is outside [0, 1]; it is compared with probabilities")
    return value


def storage_options_argument(text: str) -> dict:
    """The --storage-options JSON object."""
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as error:
        raise InvalidOptionError(f"not valid JSON ({error}): {text!r}; pass an object such as "
                                         '\'{"endpoint_url": "http://127.0.0.1:5000"}\'') from None
    if not isinstance(value, dict):
        raise InvalidOptionError(f"must be a JSON object, got {type(value).__name__}")
    return value


def add_storage_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-options", type=storage_options_argument, default=None,
        help='JSON of s3fs options for every s3:// path, e.g. \'{"endpoint_url": "http://127.0.0.1:5000", '
             '"key": "...", "secret": "..."}\', on top of AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, '
             "AWS_SESSION_TOKEN, AWS_ENDPOINT_URL[_S3], AWS_REGION (the explicit options win); the older "
             '{"client_kwargs": {"endpoint_url": ...}} form means the same')


def add_postprocess_arguments(parser: argparse.ArgumentParser, *, tasks_default: tuple[str, ...] = TASKS) -> None:
    """--tasks and the post-processing flags, with their meaning per task in the help."""
    group = parser.add_argument_group(
        "post-processing (transformers' semantics)",
        "panoptic segments never overlap; instance segments keep each full mask (binarised at probability 0.5: "
        "--mask-threshold and --overlap-threshold do not affect them, as in transformers); semantic has one "
        "segment per class present and uses none of these thresholds")
    # String defaults go through `type` too, and read as the user would write them in --help.
    group.add_argument("--tasks", type=tasks_argument, default=",".join(tasks_default),
                       help=f"comma list of {','.join(TASKS)}")
    group.add_argument("--threshold", type=probability_argument, default=POSTPROCESS_DEFAULTS["threshold"],
                       help="panoptic and instance: minimum query score of a kept segment")
    group.add_argument("--mask-threshold", type=probability_argument,
                       default=POSTPROCESS_DEFAULTS["mask_threshold"],
                       help="panoptic only: mask probability from which a pixel counts towards a query's mask "
                            "area (instance: no effect)")
    group.add_argument("--overlap-threshold", type=probability_argument,
                       default=POSTPROCESS_DEFAULTS["overlap_threshold"],
                       help="panoptic only: minimum fraction of a query's mask left visible after overlaps for "
                            "its segment to be kept (instance: no effect)")
    group.add_argument("--label-ids-to-fuse", type=label_ids_argument, default="",
                       help="panoptic only: comma list of label ids whose segments are merged into one per image "
                            "(stuff classes)")
