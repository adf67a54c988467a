"""Evaluation: ground truth scored against itself, a run's committed tables scored like the segments they hold
(a killed run's leftovers ignored), the labeling job's flag names. The model scored directly against a real run's
tables: tests/pipeline/test_evaluation_and_export_of_runs.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from job_scripts import load_job
from pipeline.rle import encode_mask
from pipeline.records import IMAGES_SCHEMA, SEGMENTS_SCHEMA, ImageRecord, SegmentRecord, table_from_records
from pipeline.sinks import write_batch, write_table_file
from pipeline.storage import StorageConfig
from training.evaluation import Predictions, load_ground_truth, read_run_predictions, score_predictions
from training.shapes import ShapesConfig, rgb_to_panoptic_id, write_shapes_dataset

NAMES = {1: "circle", 2: "square", 3: "triangle", 4: "sky", 5: "ground"}


@pytest.fixture(scope="module")
def train_eval_shapes(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("eval-shapes"), splits={"val": 5}, seed=7,
                                config=ShapesConfig(image_size=64, min_object_size=16, max_object_size=28,
                                                    min_visible_pixels=60))


def _segment(uri: str, task: str, name: str, score: float | None, mask: np.ndarray) -> SegmentRecord:
    encoded = encode_mask(mask)
    label_id = {v: k - 1 for k, v in NAMES.items()}[name]
    return SegmentRecord(image_uri=uri, image_id=uri.rsplit("/", 1)[-1], height=mask.shape[0], width=mask.shape[1],
                         task=task, segment_id=0, label_id=label_id, label=name, score=score, area=encoded["area"],
                         bbox=encoded["bbox"], rle_size=encoded["size"], rle_counts=encoded["counts"],
                         was_fused=False, model="m", run_id="r")


def _perfect_segments(root: Path, bucket: str) -> dict[str, list[SegmentRecord]]:
    """Every ground-truth segment as a prediction of all three tasks, by image URI."""
    panoptic = json.loads((root / "annotations" / "panoptic_val.json").read_text())
    by_uri = {}
    for annotation in panoptic["annotations"]:
        ids = rgb_to_panoptic_id(np.asarray(Image.open(root / "annotations" / "panoptic_val" / annotation["file_name"])))
        uri = f"{bucket}/{annotation['file_name']}"
        segments = []
        for info in annotation["segments_info"]:
            name, mask = NAMES[info["category_id"]], ids == info["id"]
            segments.append(_segment(uri, "panoptic", name, 0.9, mask))
            segments.append(_segment(uri, "semantic", name, None, mask))
            if info["category_id"] <= 3:
                segments.append(_segment(uri, "instance", name, 0.9, mask))
        by_uri[uri] = segments
    return by_uri


def _predictions(by_uri: dict[str, list[SegmentRecord]]) -> Predictions:
    return Predictions(segments=table_from_records([s for v in by_uri.values() for s in v], SEGMENTS_SCHEMA),
                       labeled_image_uris=set(by_uri))


def _commit(output: Path, stem: str, by_uri: dict[str, list[SegmentRecord]]) -> None:
    """One batch committed as the job commits it (segments file, then images file)."""
    images = [ImageRecord(image_uri=uri, image_id=uri.rsplit("/", 1)[-1], status="ok", run_id="r")
              for uri in by_uri]
    write_batch(str(output), StorageConfig.resolve(None, environ={}), stem,
                segments=table_from_records([s for v in by_uri.values() for s in v], SEGMENTS_SCHEMA),
                images=table_from_records(images, IMAGES_SCHEMA))


def test_ground_truth_scored_against_itself_is_perfect_on_every_metric(train_eval_shapes):
    ground_truth = load_ground_truth(str(train_eval_shapes), "val")
    report = score_predictions(ground_truth, _predictions(_perfect_segments(train_eval_shapes, "s3://b")))
    for group in ("all", "things", "stuff"):
        assert report["panoptic"][group]["pq"] == pytest.approx(100.0)
    assert report["instance"]["ap"] == pytest.approx(100.0)
    assert report["semantic"]["miou"] == pytest.approx(100.0)
    assert report["images_without_predictions"] == 0


def test_committed_tables_score_like_their_segments_and_a_killed_batch_is_not_scored(tmp_path, train_eval_shapes):
    by_uri = _perfect_segments(train_eval_shapes, "s3://bucket/images")
    uris = sorted(by_uri)
    by_uri[uris[0]] = [s for s in by_uri[uris[0]] if s.label != "sky"]  # make it imperfect
    output = tmp_path / "run"
    _commit(output, "r-a", {uri: by_uri[uri] for uri in uris[:2]})
    _commit(output, "r-b", {uri: by_uri[uri] for uri in uris[2:4]})
    # What a kill leaves: a batch whose segments file was written but never its images file, and a temporary
    # file; both hold perfect segments of the last image, which the job does not count as labeled.
    leftover = table_from_records(by_uri[uris[4]], SEGMENTS_SCHEMA)
    storage = StorageConfig.resolve(None, environ={})
    write_table_file(str(output), storage, "segments", "r-killed", leftover)
    pq.write_table(leftover, output / "segments" / ".tmp-0123-r-c.parquet")

    ground_truth = load_ground_truth(str(train_eval_shapes), "val")
    from_tables = score_predictions(ground_truth, read_run_predictions(str(output)))
    direct = score_predictions(ground_truth, _predictions({uri: by_uri[uri] for uri in uris[:4]}))
    assert from_tables["images_without_predictions"] == 1
    assert direct["panoptic"]["stuff"]["pq"] < 100.0
    assert from_tables == direct


def test_evaluate_takes_the_labeling_jobs_flag_names_and_the_old_spelling(capsys):
    parse_args = load_job("evaluate").parse_args
    args = parse_args(["--model", "m", "--data", "d", "--overlap-threshold", "0.6", "--mask-threshold", "0.3",
                       "--label-ids-to-fuse", "3,4", "--tasks", "panoptic"])
    assert (args.overlap_threshold, args.mask_threshold, args.label_ids_to_fuse, args.tasks) == \
        (0.6, 0.3, (3, 4), ("panoptic",))
    assert parse_args(["--model", "m", "--data", "d", "--overlap-mask-area-threshold", "0.7"]).overlap_threshold == 0.7
    assert parse_args(["--model", "m", "--data", "d"]).overlap_threshold == 0.8
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--data", "d", "--threshold", "2"])
    assert "--threshold: 2 is outside [0, 1]" in capsys.readouterr().err


def test_predictions_at_the_wrong_size_are_rejected_with_the_fix(train_eval_shapes):
    ground_truth = load_ground_truth(str(train_eval_shapes), "val")
    uri = f"s3://b/{ground_truth.images[0]['file_name']}"
    small = _segment(uri, "panoptic", "sky", 1.0, np.ones((32, 32), dtype=bool))
    with pytest.raises(ValueError, match="original image size"):
        score_predictions(ground_truth, _predictions({uri: [small]}))


def test_missing_images_and_unknown_labels_are_counted_not_fatal(train_eval_shapes):
    ground_truth = load_ground_truth(str(train_eval_shapes), "val")
    by_uri = _perfect_segments(train_eval_shapes, "s3://b")
    uris = sorted(by_uri)
    del by_uri[uris[0]]
    unknown = by_uri[uris[1]][0]
    by_uri[uris[1]].append(SegmentRecord(**{**unknown.__dict__, "label": "hexagon"}))
    report = score_predictions(ground_truth, _predictions(by_uri))
    assert report["images_without_predictions"] == 1
    assert report["unknown_labels"] == {"hexagon": 1}
    assert report["panoptic"]["all"]["pq"] < 100.0


def test_missing_annotations_name_both_files(tmp_path):
    (tmp_path / "annotations").mkdir()
    with pytest.raises(FileNotFoundError, match="panoptic_val.json.*instances_val.json"):
        load_ground_truth(str(tmp_path), "val")
