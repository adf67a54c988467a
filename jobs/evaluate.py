"""Evaluate segmentation on a COCO-format split: PQ / SQ / RQ (panoptic), mask AP (instance), mIoU (semantic).

    # a model directory, run here
    python jobs/evaluate.py --model models/m2f-shapes-tiny --data data/shapes --split val --json out/eval.json
    # the tables a labeling run wrote (jobs/segment_bucket.py --output OUT), same numbers for the same segments
    python jobs/evaluate.py --predictions OUT --data data/shapes --split val

Images are matched to predictions by file name, labels by class name. Thresholds apply to --model only
(a labeling run already applied its own); use the run's values to compare the two.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from training.evaluation import (TASKS, format_report, load_ground_truth, predict_segments,  # noqa: E402
                                 read_segment_tables, score_predictions, stuff_label_ids, write_report)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="transformers-layout checkpoint directory to run (local or s3://)")
    source.add_argument("--predictions", help="--output folder of jobs/segment_bucket.py (local or s3://)")
    parser.add_argument("--data", required=True, help="COCO-layout dataset root (local or s3://)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images (by id)")
    parser.add_argument("--threshold", type=float, default=0.5, help="min query score of a panoptic segment")
    parser.add_argument("--instance-threshold", type=float, default=None,
                        help="min score of an instance (default: --threshold)")
    parser.add_argument("--mask-threshold", type=float, default=0.5)
    parser.add_argument("--overlap-mask-area-threshold", type=float, default=0.8)
    parser.add_argument("--label-ids-to-fuse", default="", help="panoptic: comma list of label ids merged into one "
                        "segment per image (as in jobs/segment_bucket.py; default none)")
    parser.add_argument("--fuse-stuff", action="store_true",
                        help="panoptic: fuse every label that is a stuff category (isthing 0) of the split")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--storage-options", type=json.loads, default=None, help="fsspec options for s3:// paths")
    parser.add_argument("--json", dest="json_path", default=None, help="write the full report here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"--tasks {unknown} unknown; choose from {list(TASKS)}")
    started = time.time()
    fuse: set[int] = set()
    ground_truth = load_ground_truth(args.data, args.split, storage_options=args.storage_options, limit=args.limit)
    if args.model:
        from m2f_model import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        from training.train_loop import local_directory

        model_dir, download = local_directory(args.model, args.storage_options)  # s3:// is downloaded
        model = Mask2FormerForUniversalSegmentation.from_pretrained(model_dir)
        processor = Mask2FormerImageProcessor.from_pretrained(model_dir)
        if download is not None:
            download.cleanup()
        fuse = {int(label) for label in args.label_ids_to_fuse.split(",") if label.strip()}
        if args.fuse_stuff:
            fuse |= set(stuff_label_ids({int(k): v for k, v in model.config.id2label.items()}, ground_truth))
        predictions = predict_segments(model, processor, ground_truth, tasks=tasks, threshold=args.threshold,
                                       instance_threshold=args.instance_threshold,
                                       mask_threshold=args.mask_threshold,
                                       overlap_mask_area_threshold=args.overlap_mask_area_threshold,
                                       label_ids_to_fuse=sorted(fuse), batch_size=args.batch_size, device=args.device)
    else:
        predictions = read_segment_tables(args.predictions, storage_options=args.storage_options)
    report = score_predictions(ground_truth, predictions, tasks=tasks)
    report["source"] = {"model": args.model, "predictions": args.predictions, "data": args.data,
                        "threshold": args.threshold, "instance_threshold": args.instance_threshold,
                        "mask_threshold": args.mask_threshold,
                        "overlap_mask_area_threshold": args.overlap_mask_area_threshold, "limit": args.limit,
                        "label_ids_to_fuse": sorted(fuse) if args.model else None}
    report["seconds"] = round(time.time() - started, 1)
    print(format_report(report))
    if args.json_path:
        write_report(report, args.json_path, storage_options=args.storage_options)
        print(f"report written to {args.json_path}")
    return report


if __name__ == "__main__":
    main()
