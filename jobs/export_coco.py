"""Export a labeling run's tables as COCO instance JSON and COCO panoptic JSON + PNGs for review tools.

    python jobs/export_coco.py --predictions out/samples-run --output out/samples-coco
    python jobs/export_coco.py --predictions s3://bucket/labels --output s3://bucket/labels-coco \
        --storage-options '{"endpoint_url": "http://127.0.0.1:9000"}'

Writes <output>/instances.json (RLE segmentations with scores), <output>/panoptic.json and
<output>/panoptic/<image>.png (ids = R + 256 G + 256^2 B). Categories come from the run's report.json (the
model's labels), or from --model when the run has no report yet (killed before its end): category id =
label id + 1. Only committed rows are exported; images that failed are left out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from pipeline.checkpoint import localize_checkpoint  # noqa: E402
from pipeline.cli import add_storage_argument  # noqa: E402
from pipeline.coco_export import export_coco  # noqa: E402
from pipeline.model_spec import read_id2label  # noqa: E402
from pipeline.storage import StorageConfig, join_uri  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True, help="--output folder of jobs/segment_bucket.py "
                                                             "(local or s3://)")
    parser.add_argument("--output", required=True, help="folder for the COCO files (local or s3://)")
    parser.add_argument("--model", default=None, help="model directory whose labels name the categories "
                                                      "(default: the labels in the run's report.json)")
    add_storage_argument(parser)
    return parser.parse_args(argv)


def run_labels(predictions: str, model: str | None, storage: StorageConfig) -> tuple[dict[int, str], set[int]]:
    """(id2label, panoptic stuff label ids): from --model if given, else from the run's report.json."""
    report_uri = join_uri(predictions, "report.json")
    report = None
    filesystem, path = storage.filesystem(report_uri)
    if filesystem.exists(path):
        report = json.loads(storage.read_bytes(report_uri))
    stuff = set((report or {}).get("args", {}).get("label_ids_to_fuse") or ())
    if model is not None:
        return read_id2label(localize_checkpoint(model, storage)), stuff
    if report is None or not report.get("labels"):
        raise FileNotFoundError(f"{report_uri} does not exist or has no labels (the run did not finish); pass "
                                "--model with the run's model directory to name the categories")
    return {int(k): v for k, v in report["labels"].items()}, stuff


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    storage = StorageConfig.resolve(args.storage_options)
    try:
        id2label, stuff = run_labels(args.predictions, args.model, storage)
        summary = export_coco(args.predictions, args.output, storage=storage, id2label=id2label,
                              stuff_label_ids=stuff)
    except (FileNotFoundError, ValueError) as error:
        print(f"export_coco: error: {error}", file=sys.stderr)
        return 1
    print(f"Exported {summary.images} images ({summary.skipped_error_images} failed images left out): "
          f"{summary.instance_annotations} instance annotations, {summary.panoptic_segments} panoptic segments")
    for uri in summary.files:
        print(f"  {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
