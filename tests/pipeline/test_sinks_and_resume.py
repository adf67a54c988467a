"""Commit protocol and compaction: partial files never count, superseded rows disappear, nothing is lost."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.records import IMAGES_SCHEMA, SEGMENTS_SCHEMA
from pipeline.report import RESULT_COLUMNS, ResultTally, output_totals
from pipeline.resume import compact, done_image_uris, winning_rows
from pipeline.sinks import batch_file_stem, list_stems, write_batch
from pipeline.storage import StorageConfig

STORAGE = StorageConfig.resolve({}, environ={})


def image_row(uri: str, status: str, run_id: str) -> dict:
    ok = status == "ok"
    return {"image_uri": uri, "image_id": uri.rsplit("/", 1)[-1], "status": status, "height": 4, "width": 4,
            "panoptic_segments": 1 if ok else None, "instance_segments": None, "semantic_segments": None,
            "error_stage": None if ok else "decode", "error_type": None if ok else "ImageDecodeError",
            "error_message": None if ok else "bad", "run_id": run_id}


def segment_row(uri: str, run_id: str) -> dict:
    return {"image_uri": uri, "image_id": uri, "height": 4, "width": 4, "task": "panoptic", "segment_id": 1,
            "label_id": 0, "label": "circle", "score": 0.9, "area": 16, "bbox": [0.0, 0.0, 4.0, 4.0],
            "rle_size": [4, 4], "rle_counts": "0@", "was_fused": False, "model": "m", "run_id": run_id}


def commit(output: str, run_id: str, statuses: dict) -> str:
    return commit_to(output, STORAGE, run_id, statuses)


def commit_to(output: str, storage: StorageConfig, run_id: str, statuses: dict) -> str:
    images = pa.Table.from_pylist([image_row(u, s, run_id) for u, s in statuses.items()], schema=IMAGES_SCHEMA)
    segments = pa.Table.from_pylist([segment_row(u, run_id) for u, s in statuses.items() if s == "ok"],
                                    schema=SEGMENTS_SCHEMA)
    stem = batch_file_stem(run_id, list(statuses))
    write_batch(output, storage, stem, segments=segments, images=images)
    return stem


def test_batch_names_are_deterministic_so_a_retry_overwrites_its_own_files(tmp_path):
    assert batch_file_stem("r1", ["/b", "/a"]) == batch_file_stem("r1", ["/a", "/b"])
    assert batch_file_stem("r1", ["/a"]) != batch_file_stem("r2", ["/a"])
    commit(str(tmp_path), "r1", {"/a": "ok"})
    commit(str(tmp_path), "r1", {"/a": "ok"})
    assert len(list_stems(str(tmp_path), STORAGE, "images")) == 1


def test_partial_files_of_a_killed_run_never_count_and_are_removed(tmp_path):
    output = str(tmp_path)
    committed = commit(output, "r1", {"/a": "ok", "/b": "error"})
    orphan = commit(output, "r1", {"/c": "ok"})
    (tmp_path / "images" / f"{orphan}.parquet").unlink()  # killed between the segments and the images file
    (tmp_path / "images" / ".tmp-123-half.parquet").write_bytes(b"PAR1 truncated")
    result = compact(output, STORAGE)
    assert done_image_uris(result.images).to_pylist() == ["/a"]
    assert sorted(result.images["image_uri"].to_pylist()) == ["/a", "/b"]
    assert sorted(p.name for p in (tmp_path / "segments").iterdir()) == [f"{committed}.parquet"]
    assert [p.name for p in (tmp_path / "images").iterdir()] == [f"{committed}.parquet"]
    assert pq.read_table(tmp_path / "images").num_rows == 2


def test_rerun_supersedes_error_rows_and_each_image_remains_exactly_once(tmp_path):
    output = str(tmp_path)
    commit(output, "20260101T000000Z-a", {"/a": "ok", "/b": "error", "/c": "error"})
    commit(output, "20260102T000000Z-b", {"/b": "ok"})  # the re-run fixed /b, /c fails again below
    commit(output, "20260102T000000Z-b", {"/c": "error", "/d": "ok"})
    result = compact(output, STORAGE)
    rows = {r["image_uri"]: r for r in result.images.to_pylist()}
    assert {u: r["status"] for u, r in rows.items()} == {"/a": "ok", "/b": "ok", "/c": "error", "/d": "ok"}
    assert rows["/c"]["run_id"] == "20260102T000000Z-b"
    on_disk = pq.read_table(tmp_path / "images")
    assert sorted(on_disk["image_uri"].to_pylist()) == ["/a", "/b", "/c", "/d"]
    segments = pq.read_table(tmp_path / "segments")
    assert sorted(segments["image_uri"].to_pylist()) == ["/a", "/b", "/d"]
    assert compact(output, STORAGE).rewritten_stems == [], "compaction is idempotent"


def test_duplicate_ok_rows_keep_one_copy_and_its_segments(tmp_path):
    output = str(tmp_path)
    commit(output, "r1", {"/a": "ok", "/b": "ok"})
    commit(output, "r1", {"/a": "ok"})  # e.g. a retried task that saw a different batch
    compact(output, STORAGE)
    assert sorted(pq.read_table(tmp_path / "images")["image_uri"].to_pylist()) == ["/a", "/b"]
    assert sorted(pq.read_table(tmp_path / "segments")["image_uri"].to_pylist()) == ["/a", "/b"]


def test_crash_during_a_rewrite_is_resolved_by_the_next_compaction(tmp_path):
    output = str(tmp_path)
    old = commit(output, "r1", {"/a": "ok", "/b": "error"})
    commit(output, "r2", {"/b": "ok"})
    # Simulate a crash after the rewritten files were written but before the old ones were deleted.
    images = pq.read_table(tmp_path / "images" / f"{old}.parquet")
    segments = pq.read_table(tmp_path / "segments" / f"{old}.parquet")
    pq.write_table(segments, tmp_path / "segments" / f"{old}-kdeadbeef.parquet")
    pq.write_table(images.slice(0, 1), tmp_path / "images" / f"{old}-kdeadbeef.parquet")
    compact(output, STORAGE)
    on_disk = pq.read_table(tmp_path / "images")
    assert sorted(on_disk["image_uri"].to_pylist()) == ["/a", "/b"]
    assert sorted(pq.read_table(tmp_path / "segments")["image_uri"].to_pylist()) == ["/a", "/b"]


def test_compaction_rewrites_only_the_files_that_hold_superseded_rows(tmp_path):
    output = str(tmp_path)
    untouched = [commit(output, "20260101T000000Z-a", {f"/ok{i}-{j}": "ok" for j in range(3)}) for i in range(4)]
    mixed = commit(output, "20260101T000000Z-a", {"/x": "ok", "/y": "error"})
    all_failed = commit(output, "20260101T000000Z-a", {"/z": "error"})
    retried = commit(output, "20260101T000000Z-a", {"/w": "ok", "/v": "ok"})
    commit(output, "20260102T000000Z-b", {"/y": "ok", "/z": "ok", "/w": "ok"})
    before = {stem: (tmp_path / "images" / f"{stem}.parquet").stat().st_mtime_ns for stem in untouched}
    result = compact(output, STORAGE)
    assert result.rewritten_stems == sorted([mixed, retried]) and result.removed_stems == [all_failed]
    assert {stem: (tmp_path / "images" / f"{stem}.parquet").stat().st_mtime_ns for stem in untouched} == before
    images = pq.read_table(tmp_path / "images")
    assert images.num_rows == 17 and len(set(images["image_uri"].to_pylist())) == 17
    segments = pq.read_table(tmp_path / "segments")
    assert sorted(segments["image_uri"].to_pylist()) == sorted(images["image_uri"].to_pylist())
    # The result names the files that now hold each winning row: a batch that lost only an error row keeps
    # its name (its images file replaced in place), one that lost an ok row (and its segments) gets a new one.
    position_of = {uri: i for i, uri in enumerate(result.images["image_uri"].to_pylist())}
    x_stem, v_stem = result.stems_of(pa.array([position_of["/x"], position_of["/v"]]))
    assert x_stem == mixed
    assert pq.read_table(tmp_path / "images" / f"{x_stem}.parquet")["image_uri"].to_pylist() == ["/x"]
    assert v_stem.startswith(f"{retried}-k")
    assert pq.read_table(tmp_path / "segments" / f"{v_stem}.parquet")["image_uri"].to_pylist() == ["/v"]


def test_winners_match_a_row_by_row_reference_on_many_random_duplicates(tmp_path):
    import random

    rng = random.Random(7)
    rows = []
    for index in range(3000):
        uri = f"/img/{rng.randrange(1000)}"
        rows.append({**image_row(uri, rng.choice(["ok", "error"]), f"2026010{rng.randrange(3)}T000000Z-r"),
                     "_file": rng.randrange(50)})
    table = pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA.append(pa.field("_file", pa.int32())))
    expected = {}
    for row in rows:  # the ordering rule: run_id, then ok over error, then file; the last wins
        key = (row["run_id"], row["status"] == "ok", row["_file"])
        if row["image_uri"] not in expected or key >= expected[row["image_uri"]][0]:
            expected[row["image_uri"]] = (key, row)
    winners = winning_rows(table)
    assert winners.num_rows == len(expected)
    for row in winners.to_pylist():
        best = expected[row["image_uri"]][1]
        assert (row["run_id"], row["status"], row["_file"]) == (best["run_id"], best["status"], best["_file"])


def test_result_tally_counts_batches_as_they_stream_in():
    batches = [
        pa.Table.from_pylist([image_row("/a", "ok", "r"), image_row("/b", "error", "r")], schema=IMAGES_SCHEMA),
        pa.Table.from_pylist([image_row("/c", "ok", "r")], schema=IMAGES_SCHEMA),
        pa.Table.from_pylist([{**image_row("/d", "error", "r"), "error_stage": "read"}], schema=IMAGES_SCHEMA),
    ]
    tally = ResultTally()
    for arrived, batch in zip((10.0, 12.0, 14.0), batches):
        tally.add(batch.select(list(RESULT_COLUMNS)), arrived)
    assert (tally.processed, tally.ok, tally.errors) == (4, 2, 2)
    assert tally.errors_by_stage == {"decode": 1, "read": 1}
    assert tally.segments == {"panoptic": 2, "instance": 0, "semantic": 0}
    assert tally.steady_state(pipeline_started=8.0, pipeline_seconds=10.0) == {
        "pipeline_first_result_s": 2.0, "steady_images_per_s": 0.25}  # 2 rows in the 8 s after the first batch
    assert output_totals(pa.concat_tables(batches)) == {"images": 4, "ok": 2, "errors": 2,
                                                        "segments": {"panoptic": 2, "instance": 0, "semantic": 0}}


def test_compaction_on_s3_leaves_each_image_once_and_partial_objects_gone(s3_storage):
    filesystem, _ = s3_storage.filesystem("s3://compaction")
    filesystem.mkdir("compaction")
    output = "s3://compaction/out"
    for batch in range(6):
        commit_to(output, s3_storage, "20260101T000000Z-a",
                  {f"/img{batch}-{i}": ("error" if i == 0 else "ok") for i in range(4)})
    commit_to(output, s3_storage, "20260102T000000Z-b", {f"/img{batch}-0": "ok" for batch in range(6)})
    orphan = commit_to(output, s3_storage, "20260102T000000Z-b", {"/never-committed": "ok"})
    filesystem.rm_file(f"compaction/out/images/{orphan}.parquet")
    result = compact(output, s3_storage)
    assert len(result.rewritten_stems) == 6 and result.removed_stems == []
    assert result.removed_partial_files == [f"s3://compaction/out/segments/{orphan}.parquet"]
    filesystem.invalidate_cache()
    images = pq.read_table("compaction/out/images", filesystem=filesystem)
    segments = pq.read_table("compaction/out/segments", filesystem=filesystem)
    assert sorted(images["image_uri"].to_pylist()) == sorted(f"/img{b}-{i}" for b in range(6) for i in range(4))
    assert set(images["status"].to_pylist()) == {"ok"}
    assert sorted(segments["image_uri"].to_pylist()) == sorted(images["image_uri"].to_pylist())
    assert compact(output, s3_storage).rewritten_stems == []
