"""The labeling job end to end, the way a user runs it on a cluster: `ray job submit --working-dir <repo> --
python jobs/segment_bucket.py ...` to a `ray start --head` cluster on 127.0.0.1, images and model read from a
bucket on the local S3 endpoint, tables written back to s3://.

The segments are checked against the model run directly (m2f_model + its processor's post-processing, one
image at a time), not against the pipeline's own helpers.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as coco_mask

from infra.processes import cpu_seconds

pytestmark = [pytest.mark.slow,
              # pycocotools' decode on numpy 2 warns once per call; nothing to act on here.
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

TASKS = ("panoptic", "instance", "semantic")
# With the sharpened tiny model (see conftest) these keep a few segments per image in every task.
THRESHOLD = 0.1
OVERLAP_THRESHOLD = 0.0
SEGMENT_COLUMNS = ["image_uri", "image_id", "height", "width", "task", "segment_id", "label_id", "label", "score",
                   "area", "bbox", "rle_size", "rle_counts", "was_fused", "model", "run_id"]
IMAGE_COLUMNS = ["image_uri", "image_id", "status", "height", "width", *[f"{t}_segments" for t in TASKS],
                 "error_stage", "error_type", "error_message", "run_id"]


# ----------------------------------------------------------------------------------------------
# Reading what the job wrote


def read_output_table(filesystem, output_uri: str, table: str):
    """All committed Parquet files of `<output>/<table>/` as one table (hidden/temporary names excluded)."""
    directory = output_uri.removeprefix("s3://").rstrip("/") + f"/{table}"
    filesystem.invalidate_cache()
    files = sorted(path for path in filesystem.ls(directory, detail=False)
                   if path.endswith(".parquet") and not path.rsplit("/", 1)[1].startswith((".", "_")))
    assert files, f"no Parquet files under s3://{directory}"
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(path, filesystem=filesystem) for path in files]), files


def decode_rle(row: dict) -> np.ndarray:
    return coco_mask.decode({"size": list(row["rle_size"]), "counts": row["rle_counts"].encode("ascii")})


# ----------------------------------------------------------------------------------------------
# The model, run directly on one image


class DirectModel:
    """m2f_model's model and processor from the checkpoint, applied to one decoded image at a time."""

    def __init__(self, model_dir: Path) -> None:
        from m2f_model import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        self.processor = Mask2FormerImageProcessor.from_pretrained(str(model_dir))
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(str(model_dir)).eval()

    def segments(self, encoded: bytes, threshold: float, overlap_threshold: float) -> dict:
        """task -> {segment_id: (label_id, score or None, mask (H, W) bool)} at the image's own size."""
        import torch
        from PIL import Image

        image = Image.open(io.BytesIO(encoded)).convert("RGB")
        target_sizes = [(image.height, image.width)]
        inputs = self.processor(images=[image], return_tensors="pt")
        with torch.inference_mode():
            outputs = self.model(pixel_values=inputs["pixel_values"])
        panoptic = self.processor.post_process_panoptic_segmentation(
            outputs, threshold=threshold, overlap_mask_area_threshold=overlap_threshold,
            target_sizes=target_sizes)[0]
        panoptic_map = np.asarray(panoptic["segmentation"])
        instance = self.processor.post_process_instance_segmentation(
            outputs, threshold=threshold, overlap_mask_area_threshold=overlap_threshold, target_sizes=target_sizes,
            return_binary_maps=True)[0]
        semantic_map = np.asarray(self.processor.post_process_semantic_segmentation(
            outputs, target_sizes=target_sizes)[0])
        binary_maps = np.asarray(instance["segmentation"]) if instance["segments_info"] else None
        return {
            "panoptic": {int(info["id"]): (int(info["label_id"]), float(info["score"]), panoptic_map == info["id"])
                         for info in panoptic["segments_info"]},
            "instance": {int(info["id"]): (int(info["label_id"]), float(info["score"]), binary_maps[k] > 0.5)
                         for k, info in enumerate(instance["segments_info"])},
            "semantic": {int(label): (int(label), None, semantic_map == label) for label in np.unique(semantic_map)},
        }


# ----------------------------------------------------------------------------------------------
# Assertions shared by the runs


def assert_images_table(images, inputs) -> dict:
    """Every input exactly once, with the right status and stage; returns image_uri -> row."""
    assert images.column_names == IMAGE_COLUMNS
    uris = images["image_uri"].to_pylist()
    assert sorted(uris) == sorted(inputs.inputs), "each input exactly once, and nothing else"
    rows = {row["image_uri"]: row for row in images.to_pylist()}
    for uri, (height, width) in inputs.good.items():
        row = rows[uri]
        assert row["status"] == "ok", f"{uri}: {row['error_stage']} {row['error_type']}: {row['error_message']}"
        assert (row["height"], row["width"]) == (height, width)
        assert row["error_stage"] is None and row["error_type"] is None and row["error_message"] is None
        assert row["image_id"] == uri.rsplit("/", 1)[1]
    for uri, problem in inputs.bad.items():
        row = rows[uri]
        assert row["status"] == "error", f"{uri} ({problem}) was labelled"
        assert row["error_stage"] == "decode", f"{uri} ({problem}): stage {row['error_stage']}"
        assert row["error_type"] and row["error_message"], f"{uri} ({problem}) has no reason"
        assert all(row[f"{task}_segments"] in (None, 0) for task in TASKS)
    assert len(set(images["run_id"].to_pylist())) == 1
    return rows


def assert_segments_table(segments, image_rows: dict, *, model: str, tasks=TASKS) -> None:
    """Columns, RLE decoding at each image's size, area/bbox consistency, counts, no duplicates."""
    assert segments.column_names == SEGMENT_COLUMNS
    assert str(segments.schema.field("rle_counts").type) == "string"
    seen = set()
    counted: dict = {}
    for row in segments.to_pylist():
        image = image_rows[row["image_uri"]]
        assert image["status"] == "ok", f"segments for failed image {row['image_uri']}"
        key = (row["image_uri"], row["task"], row["segment_id"])
        assert key not in seen, f"duplicate segment {key}"
        seen.add(key)
        assert row["task"] in tasks
        assert (row["height"], row["width"]) == (image["height"], image["width"])
        assert list(row["rle_size"]) == [image["height"], image["width"]]
        mask = decode_rle(row)
        assert mask.shape == (image["height"], image["width"])
        assert row["area"] == int(mask.sum()) > 0
        assert np.allclose(row["bbox"], coco_mask.toBbox(
            {"size": list(row["rle_size"]), "counts": row["rle_counts"].encode("ascii")}))
        # A stable model id, not a path: the model folder's name and a digest of its weights.
        assert re.fullmatch(re.escape(model.rstrip("/").rsplit("/", 1)[-1]) + r"@[0-9a-f]{12}", row["model"]), row["model"]
        assert row["run_id"] == image["run_id"]
        assert (row["score"] is None) == (row["task"] == "semantic")
        counted[(row["image_uri"], row["task"])] = counted.get((row["image_uri"], row["task"]), 0) + 1
    for uri, image in image_rows.items():
        if image["status"] == "ok":
            for task in tasks:
                assert image[f"{task}_segments"] == counted.get((uri, task), 0), (uri, task)


def assert_segments_match_direct_model(segments, inputs, direct: DirectModel) -> None:
    by_image: dict = {}
    for row in segments.to_pylist():
        by_image.setdefault(row["image_uri"], []).append(row)
    for uri in inputs.good:
        expected = direct.segments(inputs.image_bytes[uri], THRESHOLD, OVERLAP_THRESHOLD)
        written = by_image.get(uri, [])
        for task in TASKS:
            rows = {row["segment_id"]: row for row in written if row["task"] == task}
            assert sorted(rows) == sorted(expected[task]), f"{uri} {task}: segment ids differ"
            for segment_id, (label_id, score, mask) in expected[task].items():
                row = rows[segment_id]
                assert row["label_id"] == label_id, (uri, task, segment_id)
                if score is not None:
                    assert row["score"] == pytest.approx(score, abs=1e-4), (uri, task, segment_id)
                assert np.array_equal(decode_rle(row).astype(bool), mask), f"{uri} {task} {segment_id}: mask"
    for task in TASKS:
        assert any(row["task"] == task for row in segments.to_pylist()), f"no {task} segment to compare"


def segment_job_command(*, input_uri: str, output_uri: str, model: str, batch_size: int, extra=()) -> list[str]:
    return ["python", "jobs/segment_bucket.py", "--input", input_uri, "--output", output_uri, "--model", model,
            "--tasks", ",".join(TASKS), "--threshold", str(THRESHOLD), "--overlap-threshold", str(OVERLAP_THRESHOLD),
            "--batch-size", str(batch_size),
            "--stall-timeout", "120", *extra]


# ----------------------------------------------------------------------------------------------
# Tests


def test_job_submitted_to_ray_cluster_labels_s3_bucket_into_complete_tables(
        submit_ray_job, s3_endpoint, s3_filesystem, labeling_inputs):
    inputs = labeling_inputs
    output_uri = f"s3://{inputs.bucket}/labels/{uuid.uuid4().hex[:8]}"

    # Credentials reach the driver and every worker only through the job's runtime env.
    job = submit_ray_job(segment_job_command(input_uri=inputs.images_uri, output_uri=output_uri,
                                             model=inputs.model_uri, batch_size=3),
                         env_vars=s3_endpoint.client_env(), timeout_s=200)
    assert job.returncode == 0, job.output[-6000:]

    images, _ = read_output_table(s3_filesystem, output_uri, "images")
    segments, _ = read_output_table(s3_filesystem, output_uri, "segments")
    image_rows = assert_images_table(images, inputs)
    assert_segments_table(segments, image_rows, model=inputs.model_uri)
    assert_segments_match_direct_model(segments, inputs, DirectModel(inputs.model_dir))

    report = json.loads(s3_filesystem.cat(f"{output_uri.removeprefix('s3://')}/report.json"))
    assert report["inputs_seen"] == len(inputs.inputs)
    assert report["ok"] == len(inputs.good) and report["errors"] == len(inputs.bad)
    assert report["errors_by_stage"] == {"decode": len(inputs.bad)}
    assert report["segments"] == {task: sum(1 for t in segments["task"].to_pylist() if t == task) for task in TASKS}
    assert report["run_id"] == images["run_id"][0].as_py()


def _list_actors(ray_head) -> list[dict]:
    """Every actor the cluster knows (dead ones included), from the dashboard's state API over plain HTTP:
    ~30 ms a call, and no Ray client state in the test process."""
    request = urllib.request.Request(ray_head.dashboard_url + "/api/v0/actors?limit=10000&detail=1",
                                     headers=ray_head.auth_headers())
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["data"]["result"]["result"]


def _model_actors(actors: list[dict]) -> list[dict]:
    return [a for a in actors if "InferenceStage" in (a.get("repr_name") or "") + (a.get("class_name") or "")]


def test_model_actor_killed_mid_run_is_restarted_and_output_stays_complete(
        submit_ray_job, ray_head, s3_endpoint, s3_filesystem, labeling_inputs, encoded_test_image, tmp_path):
    inputs = labeling_inputs
    # More small images and a model made slower by a larger input size (the tiny model at 384 x 384 takes
    # ~0.2 s per image on one thread): the model stage runs long enough to be killed part way.
    prefix = f"{inputs.bucket}/many-{uuid.uuid4().hex[:6]}"
    many = {}
    for index in range(48):  # with 24 the killer once never fired on a quiet machine
        uri = f"s3://{prefix}/img_{index:03d}.jpg"
        data = encoded_test_image(40 + index % 7, 48 + index % 5, seed=1000 + index, name=uri)
        s3_filesystem.pipe(uri, data)
        many[uri] = data
    slow_model = tmp_path / "tiny-384"
    shutil.copytree(inputs.model_dir, slow_model)
    processor_config = json.loads((slow_model / "preprocessor_config.json").read_text())
    processor_config["size"] = {"height": 384, "width": 384}
    (slow_model / "preprocessor_config.json").write_text(json.dumps(processor_config))
    output_uri = f"s3://{prefix}-labels"

    killed: dict = {}

    def kill_model_actor_while_it_computes() -> None:
        """SIGKILLs the model actor's process once it has spent 1 s of CPU on batches: mid forward pass,
        whatever the machine's load."""
        baseline: dict = {}
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            try:
                actors = _model_actors(_list_actors(ray_head))
            except OSError:  # the dashboard busy under load: ask again
                actors = []
            for actor in actors:
                if actor["state"] != "ALIVE" or not actor.get("pid"):
                    continue
                pid = int(actor["pid"])
                try:
                    spent = cpu_seconds(pid) - baseline.setdefault(pid, cpu_seconds(pid))
                except OSError:
                    continue
                if spent >= 1.0:
                    killed["committed_before_kill"] = _committed_image_rows(s3_filesystem, output_uri)
                    os.kill(pid, signal.SIGKILL)
                    killed.update(actor_id=actor["actor_id"], pid=pid, cpu_seconds_on_batches=spent)
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_model_actor_while_it_computes, daemon=True)
    killer.start()
    # This run gets its credentials from --storage-options instead of the runtime env.
    job = submit_ray_job(segment_job_command(
        input_uri=f"s3://{prefix}/", output_uri=output_uri, model=str(slow_model), batch_size=2,
        extra=["--storage-options", json.dumps(s3_endpoint.storage_options())]), timeout_s=220)
    killer.join(timeout=5)

    assert job.returncode == 0, job.output[-6000:]
    assert killed, "the model actor never came up or never computed, so it was never killed"
    assert killed["committed_before_kill"] < len(many), "the kill came after the job had written everything"
    restarted = [a for a in _model_actors(_list_actors(ray_head)) if a["actor_id"] == killed["actor_id"]]
    assert restarted and int(restarted[0]["num_restarts"]) >= 1, restarted  # the REST API gives a string

    images, _ = read_output_table(s3_filesystem, output_uri, "images")
    segments, _ = read_output_table(s3_filesystem, output_uri, "segments")
    assert sorted(images["image_uri"].to_pylist()) == sorted(many), "each input exactly once"
    assert set(images["status"].to_pylist()) == {"ok"}
    image_rows = {row["image_uri"]: row for row in images.to_pylist()}
    assert_segments_table(segments, image_rows, model=str(slow_model))


def _committed_image_rows(filesystem, output_uri: str) -> int:
    try:
        return read_output_table(filesystem, output_uri, "images")[0].num_rows
    except (AssertionError, FileNotFoundError):
        return 0
