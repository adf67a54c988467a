"""Evaluation end to end: ground truth scored against itself, and a model scored directly equals the same
model's segments read back from Parquet tables in the labeling job's schema."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tiny_checkpoints import save_tiny_checkpoint
from training.evaluation import (PredictedSegment, encode_mask, load_ground_truth, predict_segments,
                                 read_segment_tables, score_predictions)
from training.shapes import ShapesConfig, rgb_to_panoptic_id, write_shapes_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMES = {1: "circle", 2: "square", 3: "triangle", 4: "sky", 5: "ground"}


@pytest.fixture(scope="module")
def train_eval_shapes(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("eval-shapes"), splits={"val": 5}, seed=7,
                                config=ShapesConfig(image_size=64, min_object_size=16, max_object_size=28,
                                                    min_visible_pixels=60))


@pytest.fixture(scope="module")
def train_eval_model(tmp_path_factory) -> Path:
    # Names match the shapes categories, so predictions map onto them.
    return save_tiny_checkpoint(tmp_path_factory.mktemp("eval-model"), seed=3)


def _load_job(name: str):
    """Imports jobs/<name>.py (jobs/ is a folder of scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO_ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _perfect_predictions(root: Path) -> dict[str, list[PredictedSegment]]:
    """Every ground-truth segment as a prediction of all three tasks."""
    panoptic = json.loads((root / "annotations" / "panoptic_val.json").read_text())
    predictions = {}
    for annotation in panoptic["annotations"]:
        ids = rgb_to_panoptic_id(np.asarray(Image.open(root / "annotations" / "panoptic_val" / annotation["file_name"])))
        segments = []
        for info in annotation["segments_info"]:
            rle = encode_mask(ids == info["id"])
            name = NAMES[info["category_id"]]
            segments.append(PredictedSegment("panoptic", name, 0.9, rle))
            segments.append(PredictedSegment("semantic", name, 1.0, rle))
            if info["category_id"] <= 3:
                segments.append(PredictedSegment("instance", name, 0.9, rle))
        predictions[annotation["file_name"]] = segments
    return predictions


def _write_segments_parquet(output: Path, predictions: dict[str, list[PredictedSegment]], bucket: str) -> None:
    """segments/*.parquet in the labeling job's schema (DESIGN.md, "Output tables"), split over two files."""
    rows = []
    for file_name, segments in predictions.items():
        for number, segment in enumerate(segments):
            height, width = segment.rle["size"]
            rows.append({"image_uri": f"{bucket}/{file_name}", "image_id": file_name, "height": height,
                         "width": width, "task": segment.task, "segment_id": number, "label_id": 0,
                         "label": segment.label, "score": None if segment.task == "semantic" else segment.score,
                         "area": int(segment.mask().sum()), "bbox": [0.0, 0.0, 1.0, 1.0],
                         "rle_size": [height, width], "rle_counts": segment.rle["counts"], "was_fused": False,
                         "model": "m", "run_id": "r"})
    (output / "segments").mkdir(parents=True)
    half = len(rows) // 2
    for index, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part), output / "segments" / f"part-{index}.parquet")


def test_ground_truth_scored_against_itself_is_perfect_on_every_metric(train_eval_shapes):
    ground_truth = load_ground_truth(str(train_eval_shapes), "val")
    report = score_predictions(ground_truth, _perfect_predictions(train_eval_shapes))
    for group in ("all", "things", "stuff"):
        assert report["panoptic"][group]["pq"] == pytest.approx(100.0)
    assert report["instance"]["ap"] == pytest.approx(100.0)
    assert report["semantic"]["miou"] == pytest.approx(100.0)
    assert report["images_without_predictions"] == 0


def test_parquet_tables_give_the_same_numbers_as_the_segments_they_hold(tmp_path, train_eval_shapes):
    predictions = _perfect_predictions(train_eval_shapes)
    first = sorted(predictions)[0]
    predictions[first] = [s for s in predictions[first] if s.label != "sky"]  # make it imperfect
    _write_segments_parquet(tmp_path / "run", predictions, "s3://bucket/images")
    ground_truth = load_ground_truth(str(train_eval_shapes), "val")
    direct = score_predictions(ground_truth, predictions)
    from_tables = score_predictions(ground_truth, read_segment_tables(str(tmp_path / "run")))
    assert direct["panoptic"]["stuff"]["pq"] < 100.0
    assert from_tables == direct


def test_model_scored_directly_and_through_parquet_agree(tmp_path, train_eval_shapes, train_eval_model):
    from m2f_model import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    model = Mask2FormerForUniversalSegmentation.from_pretrained(train_eval_model)
    processor = Mask2FormerImageProcessor.from_pretrained(train_eval_model)
    ground_truth = load_ground_truth(str(train_eval_shapes), "val")
    # A random model: a zero threshold keeps its (poor) segments so there is something to compare.
    predictions = predict_segments(model, processor, ground_truth, threshold=0.0, batch_size=2)
    assert sum(len(v) for v in predictions.values()) > 0
    assert all(s.rle["size"] == [64, 64] for segments in predictions.values() for s in segments)
    _write_segments_parquet(tmp_path / "run", predictions, "file:///data/bucket")

    evaluate_main = _load_job("evaluate").main

    direct = evaluate_main(["--model", str(train_eval_model), "--data", str(train_eval_shapes), "--threshold", "0",
                            "--batch-size", "2", "--json", str(tmp_path / "direct.json")])
    tables = evaluate_main(["--predictions", str(tmp_path / "run"), "--data", str(train_eval_shapes)])
    for task in ("panoptic", "instance", "semantic"):
        assert tables[task] == direct[task], task
    assert json.loads((tmp_path / "direct.json").read_text())["panoptic"] == direct["panoptic"]


def test_predictions_at_the_wrong_size_are_rejected_with_the_fix(train_eval_shapes):
    ground_truth = load_ground_truth(str(train_eval_shapes), "val")
    small = encode_mask(np.ones((32, 32), dtype=bool))
    key = ground_truth.images[0]["file_name"]
    with pytest.raises(ValueError, match="original image size"):
        score_predictions(ground_truth, {key: [PredictedSegment("panoptic", "sky", 1.0, small)]})


def test_missing_images_and_unknown_labels_are_counted_not_fatal(train_eval_shapes):
    ground_truth = load_ground_truth(str(train_eval_shapes), "val")
    predictions = _perfect_predictions(train_eval_shapes)
    dropped = sorted(predictions)[0]
    del predictions[dropped]
    other = sorted(predictions)[0]
    predictions[other].append(PredictedSegment("panoptic", "hexagon", 0.9, predictions[other][0].rle))
    report = score_predictions(ground_truth, predictions)
    assert report["images_without_predictions"] == 1
    assert report["unknown_labels"] == {"hexagon": 1}
    assert report["panoptic"]["all"]["pq"] < 100.0


def test_missing_annotations_name_both_files(tmp_path):
    (tmp_path / "annotations").mkdir()
    with pytest.raises(FileNotFoundError, match="panoptic_val.json.*instances_val.json"):
        load_ground_truth(str(tmp_path), "val")
