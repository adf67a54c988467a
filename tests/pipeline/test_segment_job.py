"""The whole job on an embedded Ray (local folders): every table, RLE back to the model's own masks, bad files
as error rows, resume after an interrupted run, a stalled stage named, a broken model refused at once."""
from __future__ import annotations

import functools
import io
import json
import os
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from pipeline import SegmentationOptions, run_segmentation
from pipeline.checkpoint import ModelLoadError
from pipeline.progress import PipelineStalledError
from pipeline.segment_job import OutputNotEmptyError
from pipeline_test_images import image_bytes, random_rgb, write_image

TASKS = ("panoptic", "instance", "semantic")
LOW = {"threshold": 0.05, "mask_threshold": 0.1, "overlap_threshold": 0.5}
IMAGE_COLUMNS = ["image_uri", "image_id", "status", "height", "width", "panoptic_segments", "instance_segments",
                 "semantic_segments", "error_stage", "error_type", "error_message", "run_id"]
SEGMENT_COLUMNS = ["image_uri", "image_id", "height", "width", "task", "segment_id", "label_id", "label", "score",
                   "area", "bbox", "rle_size", "rle_counts", "was_fused", "model", "run_id"]


def options(input_dir, output_dir, model, **overrides) -> SegmentationOptions:
    settings = {"input": str(input_dir), "output": str(output_dir), "model": str(model), "batch_size": 2,
                "images_per_file": 3, "show_progress": False, "stall_timeout": 300, **LOW}
    settings.update(overrides)
    return SegmentationOptions(**settings)


@functools.lru_cache(maxsize=4)
def load_direct_model(checkpoint: str):
    """The checkpoint's processor and model, loaded once per test module."""
    from m2f_model import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    return (Mask2FormerImageProcessor.from_pretrained(checkpoint),
            Mask2FormerForUniversalSegmentation.from_pretrained(checkpoint).eval())


def direct_segments(checkpoint, encoded: bytes) -> dict:
    """task -> {segment_id: (label_id, score, mask)} from the model and its processor on this one image."""
    processor, model = load_direct_model(str(checkpoint))
    image = Image.open(io.BytesIO(encoded)).convert("RGB")
    sizes = [(image.height, image.width)]
    with torch.inference_mode():
        outputs = model(pixel_values=processor(images=[image], return_tensors="pt")["pixel_values"])
    panoptic = processor.post_process_panoptic_segmentation(
        outputs, threshold=LOW["threshold"], mask_threshold=LOW["mask_threshold"],
        overlap_mask_area_threshold=LOW["overlap_threshold"], label_ids_to_fuse=set(), target_sizes=sizes)[0]
    instance = processor.post_process_instance_segmentation(
        outputs, threshold=LOW["threshold"], mask_threshold=LOW["mask_threshold"],
        overlap_mask_area_threshold=LOW["overlap_threshold"], target_sizes=sizes, return_binary_maps=True)[0]
    semantic = np.asarray(processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)[0])
    panoptic_map = np.asarray(panoptic["segmentation"])
    return {
        "panoptic": {i["id"]: (i["label_id"], i["score"], panoptic_map == i["id"]) for i in panoptic["segments_info"]},
        "instance": {i["id"]: (i["label_id"], i["score"], np.asarray(instance["segmentation"])[k] > 0.5)
                     for k, i in enumerate(instance["segments_info"])},
        "semantic": {int(c): (int(c), None, semantic == c) for c in np.unique(semantic)},
    }


def decode(row: dict) -> np.ndarray:
    return coco_mask.decode({"size": list(row["rle_size"]), "counts": row["rle_counts"]}).astype(bool)


@pytest.fixture
def mixed_folder(tmp_path):
    """Good images of several sizes and modes, and one of each kind of bad input."""
    folder = tmp_path / "inputs"
    good = {"a_small.png": (40, 56), "b_tall.jpg": (90, 48), "c_square.png": (64, 64), "d_wide.png": (33, 97)}
    for index, (name, (height, width)) in enumerate(good.items()):
        write_image(folder / name, height, width, seed=index)
    gray = (random_rgb(48, 40, seed=9)[..., 0])
    (folder / "sub").mkdir()
    (folder / "sub" / "e_gray.png").write_bytes(image_bytes(gray))
    good["sub/e_gray.png"] = (48, 40)
    jpeg = image_bytes(random_rgb(64, 64, seed=5), "JPEG")
    bad = {"x_empty.png": ("decode", b""), "x_truncated.jpg": ("decode", jpeg[: len(jpeg) // 2]),
           "x_text.png": ("decode", b"hello, I am not a picture\n"),
           "x_huge.png": ("decode", _png_header(60_000, 60_000))}
    for name, (_, data) in bad.items():
        (folder / name).write_bytes(data)
    os.symlink(folder / "does-not-exist.jpg", folder / "x_unreadable.jpg")
    bad["x_unreadable.jpg"] = ("read", None)
    return folder, good, {name: stage for name, (stage, _) in bad.items()}


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def test_job_labels_a_folder_with_bad_files_into_complete_exact_tables(
        ray_session, mixed_folder, tmp_path, tiny_checkpoint_seed1):
    folder, good, bad = mixed_folder
    output = tmp_path / "out"
    report = run_segmentation(options(folder, output, tiny_checkpoint_seed1, overlays=2))

    images = pq.read_table(output / "images")
    assert images.column_names == IMAGE_COLUMNS
    rows = {r["image_id"]: r for r in images.to_pylist()}
    assert sorted(images["image_id"].to_pylist()) == sorted([*good, *bad]), "each input exactly once"
    for name, (height, width) in good.items():
        assert rows[name]["status"] == "ok", rows[name]
        assert (rows[name]["height"], rows[name]["width"]) == (height, width)
        assert rows[name]["image_uri"] == str(folder / name)
    for name, stage in bad.items():
        assert rows[name]["status"] == "error" and rows[name]["error_stage"] == stage, rows[name]
        assert rows[name]["error_type"] and rows[name]["error_message"]
    assert "60000x60000" in rows["x_huge.png"]["error_message"] or "bomb" in rows["x_huge.png"]["error_message"]
    assert len(list((output / "images").glob("*.parquet"))) >= 2, "several committed batches"

    segments = pq.read_table(output / "segments")
    assert segments.column_names == SEGMENT_COLUMNS
    by_key = {}
    for row in segments.to_pylist():
        key = (row["image_id"], row["task"], row["segment_id"])
        assert key not in by_key, f"duplicate segment {key}"
        by_key[key] = row
    for name in good:
        expected = direct_segments(tiny_checkpoint_seed1, (folder / name).read_bytes())
        for task in TASKS:
            written = {k[2]: r for k, r in by_key.items() if k[0] == name and k[1] == task}
            assert sorted(written) == sorted(expected[task]), (name, task)
            assert rows[name][f"{task}_segments"] == len(written)
            for segment_id, (label_id, score, mask) in expected[task].items():
                row = written[segment_id]
                assert row["label_id"] == label_id and row["label"]
                assert (row["score"] is None) == (score is None)
                if score is not None:
                    assert row["score"] == pytest.approx(score, abs=1e-4)
                decoded = decode(row)
                assert decoded.shape == good[name] and np.array_equal(decoded, mask), (name, task, segment_id)
                assert row["area"] == mask.sum()
    assert any(k[1] == "panoptic" for k in by_key) and any(k[1] == "instance" for k in by_key)

    on_disk = json.loads((output / "report.json").read_text())
    assert on_disk["run_id"] == report["run_id"] == images["run_id"].to_pylist()[0]
    assert (report["inputs_seen"], report["ok"], report["errors"]) == (len(good) + len(bad), len(good), len(bad))
    assert report["errors_by_stage"] == {"decode": 4, "read": 1}
    assert report["segments"] == {t: sum(1 for k in by_key if k[1] == t) for t in TASKS}
    assert report["images_per_s"] > 0 and report["args"]["batch_size"] == 2
    overlays = sorted((output / "overlays").glob("*.png"))
    assert len(overlays) == 2
    assert Image.open(overlays[0]).size == (56, 40)  # a_small.png, width x height

    with pytest.raises(OutputNotEmptyError, match="--resume"):
        run_segmentation(options(folder, output, tiny_checkpoint_seed1))


def test_resume_after_an_interrupted_run_finishes_with_every_image_exactly_once(
        ray_session, tmp_path, tiny_checkpoint_seed1):
    folder = tmp_path / "inputs"
    names = [f"img_{i}.png" for i in range(6)]
    for index, name in enumerate(names):
        write_image(folder / name, 40 + 4 * index, 48, seed=index)
    (folder / "img_9_fixed_later.png").write_bytes(b"")
    output = tmp_path / "out"
    first = run_segmentation(options(folder, output, tiny_checkpoint_seed1, limit=5, images_per_file=2,
                                     batch_size=1))
    assert first["processed"] == 5
    # Interrupt: one batch lost its images file (killed between its two writes), half-written temp files remain.
    lost_batch = sorted((output / "images").glob("*.parquet"))[0]
    lost_uris = set(pq.read_table(lost_batch)["image_uri"].to_pylist())
    lost_batch.unlink()
    (output / "images" / ".tmp-0-partial.parquet").write_bytes(b"PAR1")
    (output / "segments" / ".tmp-0-partial.parquet").write_bytes(b"PAR1")
    first_ok = {r["image_uri"]: r for r in pq.read_table(output / "images").to_pylist() if r["status"] == "ok"}
    write_image(folder / "img_9_fixed_later.png", 30, 30, seed=99)  # a failed input the user repaired

    second = run_segmentation(options(folder, output, tiny_checkpoint_seed1, resume=True, images_per_file=2,
                                      batch_size=1))
    assert second["skipped_already_ok"] == len(first_ok)
    assert second["processed"] == 7 - len(first_ok)
    images = pq.read_table(output / "images")
    assert sorted(images["image_id"].to_pylist()) == sorted([*names, "img_9_fixed_later.png"])
    assert set(images["status"].to_pylist()) == {"ok"}
    run_of = {r["image_uri"]: r["run_id"] for r in images.to_pylist()}
    assert all(run_of[uri] == first["run_id"] for uri in first_ok)
    assert all(run_of[uri] == second["run_id"] for uri in lost_uris)
    segments = pq.read_table(output / "segments").to_pylist()
    keys = [(r["image_uri"], r["task"], r["segment_id"]) for r in segments]
    assert len(keys) == len(set(keys)), "no segment twice"
    assert all(r["run_id"] == run_of[r["image_uri"]] for r in segments), "segments only from the winning run"
    for row in images.to_pylist():
        for task in TASKS:
            assert row[f"{task}_segments"] == sum(1 for k in keys if k[0] == row["image_uri"] and k[1] == task)
    leftovers = [p.name for d in ("images", "segments") for p in (output / d).iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert {p.stem for p in (output / "segments").iterdir()} == {p.stem for p in (output / "images").iterdir()}


def test_a_stalled_stage_fails_the_job_naming_the_stage(ray_session, tmp_path, tiny_checkpoint_seed1):
    folder = tmp_path / "inputs"
    write_image(folder / "a.png", 32, 32)
    fifo = folder / "b_never_ends.png"
    os.mkfifo(fifo)  # reading it blocks until a writer shows up
    try:
        started = time.monotonic()
        with pytest.raises(PipelineStalledError, match="stalled in stage 'read'"):
            run_segmentation(options(folder, tmp_path / "out", tiny_checkpoint_seed1, batch_size=1,
                                     stall_timeout=10))
        assert time.monotonic() - started < 240
    finally:
        unblock = threading.Thread(target=lambda: open(fifo, "wb").close(), daemon=True)
        unblock.start()
        unblock.join(timeout=5)


def test_a_model_that_cannot_load_fails_at_once_with_the_reason(tmp_path, tiny_checkpoint):
    folder = tmp_path / "inputs"
    write_image(folder / "a.png", 16, 16)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    with pytest.raises(ModelLoadError, match="lacks config.json"):
        run_segmentation(options(folder, tmp_path / "out", broken))
    for name in ("config.json", "preprocessor_config.json"):
        (broken / name).write_bytes((tiny_checkpoint / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"definitely not safetensors")
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="cannot load the model"):
        run_segmentation(options(folder, tmp_path / "out", broken))
    assert time.monotonic() - started < 30
    assert not (tmp_path / "out" / "images").exists()


def _committed(directory) -> set[str]:
    """Stems of committed Parquet files: pathlib's glob also matches the hidden temporary file being written."""
    return {p.stem for p in directory.glob("*.parquet") if not p.name.startswith(".")} if directory.exists() else set()


def test_job_killed_part_way_then_resumed_has_every_image_exactly_once(
        ray_session, tmp_path, tiny_checkpoint_seed1):
    """SIGKILL every process of the CLI's session (driver, embedded Ray, actors) once a batch has committed."""
    import signal
    import subprocess
    import sys

    from pipeline.segment_job import REPO_ROOT

    folder = tmp_path / "inputs"
    names = [f"img_{i:02d}.png" for i in range(12)]
    for index, name in enumerate(names):
        write_image(folder / name, 32 + 2 * index, 40, seed=index)
    output = tmp_path / "out"
    command = [sys.executable, str(REPO_ROOT / "jobs" / "segment_bucket.py"), "--input", str(folder),
               "--output", str(output), "--model", str(tiny_checkpoint_seed1), "--batch-size", "1",
               "--images-per-file", "1", "--no-progress", "--threshold", str(LOW["threshold"]),
               "--mask-threshold", str(LOW["mask_threshold"]), "--overlap-threshold", str(LOW["overlap_threshold"])]
    job = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and job.poll() is None:
            if _committed(output / "images"):
                break
            time.sleep(0.1)
    finally:
        _kill_session(job.pid, signal.SIGKILL)
        job.wait()
        time.sleep(0.5)
        _kill_session(job.pid, signal.SIGKILL)  # anything spawned while the first sweep ran
    committed_before = _committed(output / "images")
    assert 1 <= len(committed_before) < len(names), "the kill must land part way"

    report = run_segmentation(options(folder, output, tiny_checkpoint_seed1, resume=True))
    assert report["skipped_already_ok"] == len(committed_before)
    assert report["processed"] == len(names) - len(committed_before)
    images = pq.read_table(output / "images")
    assert sorted(images["image_id"].to_pylist()) == names and set(images["status"].to_pylist()) == {"ok"}
    segments = pq.read_table(output / "segments").to_pylist()
    keys = [(r["image_uri"], r["task"], r["segment_id"]) for r in segments]
    assert len(keys) == len(set(keys))
    for row in images.to_pylist():
        assert row["semantic_segments"] == sum(1 for k in keys if k[0] == row["image_uri"] and k[1] == "semantic")
    assert {p.stem for p in (output / "segments").iterdir()} == {p.stem for p in (output / "images").iterdir()}


def _kill_session(session_id: int, sig: int) -> None:
    """Signals every process whose session is `session_id` (Ray puts each worker in its own process group, so
    killing the driver's group alone would let an actor finish the write it is in)."""
    from infra.processes import all_process_stats

    for stat in all_process_stats():
        if stat.session == session_id:
            try:
                os.kill(stat.pid, sig)
            except ProcessLookupError:
                pass
