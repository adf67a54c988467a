"""Label a folder, a bucket prefix or a manifest of images with Mask2Former; write Parquet tables of COCO RLE.

    python jobs/segment_bucket.py                      # the sample images, the shipped model, out/samples-run
    python jobs/segment_bucket.py --input s3://bucket/photos --output s3://bucket/labels --resume
    ray job submit --working-dir . -- python jobs/segment_bucket.py --input ... --output ...

Run directly it starts an embedded Ray on 127.0.0.1; under `ray job submit` (or with --ray-address) it
joins that cluster. Exit status: 0 when the run finished (even with per-image errors, which are rows in
images/), 1 when the job itself failed (model not loadable, stall, unreachable storage).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.checkpoint import ModelLoadError  # noqa: E402
from pipeline.cli import add_postprocess_arguments, add_storage_argument  # noqa: E402
from pipeline.local_ray import drop_ray_false_alarms_from_stderr  # noqa: E402
from pipeline.pools import PoolPlacementError  # noqa: E402
from pipeline.progress import PipelineStalledError  # noqa: E402
from pipeline.segment_job import OutputNotEmptyError, SegmentationOptions, run_segmentation  # noqa: E402

DEFAULTS = SegmentationOptions()


def parse_args(argv: list[str] | None = None) -> SegmentationOptions:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", default=DEFAULTS.input,
                        help="folder, file://, s3://bucket/prefix, any fsspec URI, or a manifest "
                             "(.parquet/.csv/.txt of image URIs)")
    parser.add_argument("--output", default=DEFAULTS.output, help="local folder or s3:// prefix for the tables")
    parser.add_argument("--model", default=DEFAULTS.model,
                        help="checkpoint directory in transformers' layout (local or s3://)")
    add_postprocess_arguments(parser, tasks_default=DEFAULTS.tasks)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                        help="images per forward pass (default: 16 on a GPU, 4 on CPU)")
    parser.add_argument("--preprocess-actors", type=int, default=None, help="decode/preprocess actors "
                                                                            "(default: enough for the model's rate)")
    parser.add_argument("--model-actors", type=int, default=None, help="model actors (default: one per GPU, else "
                                                                       "up to 8 CPUs each on every node with room)")
    parser.add_argument("--postprocess-actors", type=int, default=None, help="post-process/write actors")
    parser.add_argument("--dtype", default=DEFAULTS.dtype, choices=["float32", "bfloat16", "float16"],
                        help="model weights and activations dtype (default: bfloat16 on a GPU, float32 on CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model in each model actor (slow first batch; compile time in "
                             "report.json)")
    parser.add_argument("--limit", type=int, default=None, help="label at most the first N inputs")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output: skip images "
                                                              "recorded 'ok', redo the rest")
    parser.add_argument("--overwrite", action="store_true", help="delete the tables in --output first")
    add_storage_argument(parser)
    parser.add_argument("--overlays", type=int, default=0, metavar="N",
                        help="also write PNG overlays for N images to <output>/overlays/")
    parser.add_argument("--stall-timeout", type=float, default=DEFAULTS.stall_timeout,
                        help="fail when no stage makes progress for this many seconds")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else an "
                                                            "embedded local Ray)")
    parser.add_argument("--images-per-file", type=int, default=DEFAULTS.images_per_file,
                        help="images per committed Parquet file (the unit of resume)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULTS.max_image_pixels,
                        help="larger images become error rows (decompression-bomb guard)")
    parser.add_argument("--max-object-bytes", type=int, default=DEFAULTS.max_object_bytes,
                        help="larger objects become error rows")
    parser.add_argument("--no-progress", action="store_true", help="hide Ray Data's progress bars")
    args = parser.parse_args(argv)
    return SegmentationOptions(
        input=args.input, output=args.output, model=args.model, tasks=args.tasks, threshold=args.threshold,
        mask_threshold=args.mask_threshold, overlap_threshold=args.overlap_threshold,
        label_ids_to_fuse=args.label_ids_to_fuse, batch_size=args.batch_size,
        preprocess_actors=args.preprocess_actors, model_actors=args.model_actors,
        postprocess_actors=args.postprocess_actors, dtype=args.dtype, compile=args.compile, limit=args.limit,
        resume=args.resume,
        overwrite=args.overwrite, storage_options=args.storage_options, overlays=args.overlays,
        stall_timeout=args.stall_timeout, ray_address=args.ray_address, images_per_file=args.images_per_file,
        max_image_pixels=args.max_image_pixels, max_object_bytes=args.max_object_bytes,
        show_progress=not args.no_progress)


def print_summary(report: dict) -> None:
    segments = ", ".join(f"{task} {count}" for task, count in report["segments"].items())
    totals = report["output_totals"]
    print(f"\nLabeled {report['processed']} images in {report['wall_time_s']:.1f} s "
          f"({report['images_per_s'] or 0:.2f} images/s): {report['ok']} ok, {report['errors']} errors"
          + (f" ({', '.join(f'{k}: {v}' for k, v in report['errors_by_stage'].items())})" if report["errors"] else "")
          + (f"; {report['skipped_already_ok']} already done" if report["skipped_already_ok"] else ""))
    print(f"Segments written this run: {segments}")
    print(f"Output now holds {totals['images']} images ({totals['ok']} ok, {totals['errors']} errors).")
    print(f"  segments table: {report['tables']['segments']}")
    print(f"  images table:   {report['tables']['images']}")
    print(f"  report:         {report['report_uri']}")
    for uri in report["overlays"]:
        print(f"  overlay:        {uri}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    drop_ray_false_alarms_from_stderr()
    try:
        options = parse_args(argv)
        report = run_segmentation(options)
    except (ModelLoadError, PipelineStalledError, PoolPlacementError, OutputNotEmptyError, FileNotFoundError,
            ValueError) as error:
        print(f"segment_bucket: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("segment_bucket: interrupted; committed batches are kept, re-run with --resume to finish",
              file=sys.stderr)
        return 130
    print_summary(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
