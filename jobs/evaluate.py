"""Evaluate segmentation on a COCO-format split: PQ / SQ / RQ (panoptic), mask AP (instance), mIoU (semantic).

    # a model directory, run here with the labeling job's own preprocessing and post-processing
    python jobs/evaluate.py --model models/m2f-shapes-tiny --data data/shapes --split val --json out/eval.json
    # the tables a labeling run wrote (jobs/segment_bucket.py --output OUT): same numbers for the same thresholds
    python jobs/evaluate.py --predictions OUT --data data/shapes --split val
    # a COCO export of those tables (jobs/export_coco.py --output EXPORT): panoptic and instance
    python jobs/evaluate.py --coco-export EXPORT --data data/shapes --split val

Images are matched to predictions by file name, labels by class name. The post-processing flags apply to
--model only (a labeling run already applied its own); they have the same names and meaning as in
jobs/segment_bucket.py, so pass the run's values to compare the two. A run's tables are read as the job sees
them: committed batches only, so a killed run is scored on what it finished.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from pipeline.checkpoint import TORCH_DTYPES, localize_checkpoint  # noqa: E402
from pipeline.cli import add_postprocess_arguments, add_storage_argument, probability_argument  # noqa: E402
from pipeline.device_postprocess import PostprocessSettings  # noqa: E402
from pipeline.model_spec import read_id2label  # noqa: E402
from pipeline.storage import StorageConfig  # noqa: E402
from training.evaluation import (format_report, load_ground_truth, predict_segments,  # noqa: E402
                                 read_export_predictions, read_run_predictions, score_predictions,
                                 stuff_label_ids, write_report)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="transformers-layout checkpoint directory to run (local or s3://)")
    source.add_argument("--predictions", help="--output folder of jobs/segment_bucket.py (local or s3://)")
    source.add_argument("--coco-export", help="--output folder of jobs/export_coco.py (local or s3://)")
    parser.add_argument("--data", required=True, help="COCO-layout dataset root (local or s3://)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images (by id)")
    add_postprocess_arguments(parser)
    parser.add_argument("--overlap-mask-area-threshold", dest="overlap_threshold", type=probability_argument,
                        default=argparse.SUPPRESS, help="deprecated spelling of --overlap-threshold")
    parser.add_argument("--fuse-stuff", action="store_true",
                        help="panoptic: also fuse every label that is a stuff category (isthing 0) of the split")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--dtype", default="float32", choices=TORCH_DTYPES, help="model weights and activations")
    add_storage_argument(parser)
    parser.add_argument("--json", dest="json_path", default=None, help="write the full report here (local or s3://)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.time()
    storage = StorageConfig.resolve(args.storage_options)
    ground_truth = load_ground_truth(args.data, args.split, storage=storage, limit=args.limit)
    fuse = tuple(args.label_ids_to_fuse)
    if args.model:
        if args.fuse_stuff:
            id2label = read_id2label(localize_checkpoint(args.model, storage))
            fuse = tuple(sorted(set(fuse) | set(stuff_label_ids(id2label, ground_truth))))
        settings = PostprocessSettings(tasks=args.tasks, threshold=args.threshold,
                                       mask_threshold=args.mask_threshold, overlap_threshold=args.overlap_threshold,
                                       label_ids_to_fuse=fuse)
        predictions = predict_segments(args.model, ground_truth, settings=settings, storage=storage,
                                       batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    elif args.predictions:
        predictions = read_run_predictions(args.predictions, storage=storage)
    else:
        predictions = read_export_predictions(args.coco_export, storage=storage)
    report = score_predictions(ground_truth, predictions, tasks=args.tasks)
    report["source"] = {"model": args.model, "predictions": args.predictions, "coco_export": args.coco_export,
                        "data": args.data, "limit": args.limit}
    if args.model:
        report["source"].update(threshold=args.threshold, mask_threshold=args.mask_threshold,
                                overlap_threshold=args.overlap_threshold, label_ids_to_fuse=list(fuse))
    report["seconds"] = round(time.time() - started, 1)
    print(format_report(report))
    if args.json_path:
        write_report(report, args.json_path, storage=storage)
        print(f"report written to {args.json_path}")
    return report


if __name__ == "__main__":
    main()
