"""A labeling run killed between a batch's two writes, then resumed: evaluating its tables gives the numbers of
evaluating the model directly, and its COCO export loads in pycocotools and scores like the tables."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from job_scripts import load_job
from pipeline import run_segmentation
from pipeline.run_tables import read_run_tables
from pipeline.storage import StorageConfig
from tiny_checkpoints import save_tiny_checkpoint
from training.shapes import ShapesConfig, write_shapes_dataset

TASKS = ("panoptic", "instance", "semantic")


@pytest.fixture(scope="module")
def killed_then_resumed_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("killed-run")
    data = write_shapes_dataset(root / "data", splits={"val": 6}, seed=7,
                                config=ShapesConfig(image_size=64, min_object_size=16, max_object_size=28,
                                                    min_visible_pixels=60))
    model = save_tiny_checkpoint(root / "model", seed=3)  # label names are the shapes categories
    output = root / "run"
    # A random model: a zero threshold keeps its (poor) segments so there is something to compare.
    options = {"input": str(data / "val"), "output": str(output), "model": str(model), "threshold": 0.0,
               "batch_size": 2, "images_per_file": 2, "show_progress": False, "stall_timeout": 300}
    run_segmentation(options)
    # What a kill between a batch's two writes leaves: its segments file without its images file, and a
    # temporary file holding a copy of another batch's segments.
    stems = sorted(path.stem for path in (output / "images").glob("*.parquet"))
    (output / "images" / f"{stems[-1]}.parquet").unlink()
    (output / "segments" / f".tmp-0123-{stems[0]}.parquet").write_bytes(
        (output / "segments" / f"{stems[0]}.parquet").read_bytes())
    evaluate = load_job("evaluate").main
    killed = evaluate(["--predictions", str(output), "--data", str(data)])
    run_segmentation({**options, "resume": True})
    return {"data": data, "model": model, "output": output, "killed": killed,
            "resumed": evaluate(["--predictions", str(output), "--data", str(data)])}


def test_a_killed_run_is_scored_on_its_committed_batches_only(killed_then_resumed_run):
    assert killed_then_resumed_run["killed"]["images_without_predictions"] == 2  # the uncommitted batch


def test_evaluating_a_killed_then_resumed_runs_tables_equals_evaluating_the_model(killed_then_resumed_run,
                                                                                   tmp_path):
    run = killed_then_resumed_run
    direct = load_job("evaluate").main(["--model", str(run["model"]), "--data", str(run["data"]), "--threshold", "0",
                                        "--batch-size", "2", "--json", str(tmp_path / "direct.json")])
    assert run["resumed"]["images_without_predictions"] == 0
    for task in TASKS:
        assert run["resumed"][task] == direct[task], task
    assert json.loads((tmp_path / "direct.json").read_text())["panoptic"] == direct["panoptic"]


def test_coco_export_loads_in_pycocotools_and_scores_like_the_tables(killed_then_resumed_run, tmp_path):
    run = killed_then_resumed_run
    assert load_job("export_coco").main(["--predictions", str(run["output"]), "--output", str(tmp_path)]) == 0
    tables = read_run_tables(str(run["output"]), StorageConfig.resolve(None, environ={}))
    segments = tables.segments.to_pylist()

    instances = COCO(str(tmp_path / "instances.json"))
    table_instances = [row for row in segments if row["task"] == "instance"]
    assert len(instances.getAnnIds()) == len(table_instances) > 0
    assert {c["name"] for c in instances.loadCats(instances.getCatIds())} == \
        {"circle", "square", "triangle", "sky", "ground"}
    by_counts = {row["rle_counts"]: row for row in table_instances}
    for annotation in instances.loadAnns(instances.getAnnIds()):
        row = by_counts[annotation["segmentation"]["counts"]]
        assert annotation["score"] == pytest.approx(row["score"])
        assert instances.annToMask(annotation).sum() == row["area"]
        assert instances.imgs[annotation["image_id"]]["file_name"] == row["image_id"]

    panoptic = json.loads((tmp_path / "panoptic.json").read_text())
    assert len(panoptic["annotations"]) == 6
    annotation = panoptic["annotations"][0]
    file_name = next(i["file_name"] for i in panoptic["images"] if i["id"] == annotation["image_id"])
    rgb = np.asarray(Image.open(tmp_path / "panoptic" / annotation["file_name"]).convert("RGB"), dtype=np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    for info in annotation["segments_info"]:
        row = next(r for r in segments if r["task"] == "panoptic" and r["image_id"] == file_name
                   and r["segment_id"] == info["id"])
        mask = coco_mask.decode({"size": row["rle_size"], "counts": row["rle_counts"].encode()}).astype(bool)
        assert np.array_equal(ids == info["id"], mask)

    from_export = load_job("evaluate").main(["--coco-export", str(tmp_path), "--data", str(run["data"])])
    for task in ("panoptic", "instance"):
        assert from_export[task] == run["resumed"][task], task


def test_panoptic_png_names_follow_coco_and_never_collide():
    from pipeline.coco_export import panoptic_png_name

    taken: set[str] = set()
    assert [panoptic_png_name(name, taken) for name in ("a/b.jpg", "a/b.png", "c.png")] == \
        ["a/b.png", "a/b.png.png", "c.png"]
