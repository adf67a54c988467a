"""Bookkeeping at bucket scale on the loopback S3 endpoint (moto): listing, resume check, compaction, report.

    python benchmarks/scale_bookkeeping.py                          # 1M-entry manifest, 100k finished output
    python benchmarks/scale_bookkeeping.py --manifest-entries 200000 --finished-images 20000 --bucket-objects 2000
    python benchmarks/scale_bookkeeping.py --compare-with /path/to/other/checkout   # same data, both codes

What it builds on a fresh moto server on 127.0.0.1 (untimed, in this process):
- a Parquet manifest of --manifest-entries image URIs (s3://scale/photos/<shard>/<n>.jpg; objects absent);
- a half-done output of that manifest: the first half labeled, 1% of them error rows, then a re-run that
  fixed those errors (so compaction has superseded rows to remove), files of --images-per-file images;
- a finished output of the first --finished-images entries (all ok), and a manifest of just those;
- --bucket-objects small objects under s3://scale/bucket/<prefix>/ for a folder listing.

What it measures, each case in a fresh child process (peak RSS = that process's VmHWM, i.e. the job's
driver, imports included: `pipeline` brings Ray and torch along, ~0.3-0.5 GiB before any work):
1. listing + resume check: `list_inputs` of the big manifest, `compact` of the half-done output, and the
   anti-join that leaves the inputs still to label;
2. no-op --resume: listing + compaction of the finished output alone, then the whole
   `run_segmentation(resume=True)` over it (nothing to label, Ray never starts);
3. bucket listing: `list_inputs` of the folder.
It prints the times, peak RSS and files per table. The machine's load average is printed with them:
timings on a shared machine are only comparable within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from infra.processes import status_kib  # noqa: E402

BUCKET = "scale"
RUN_FIRST = "20260101T000000000000Z-first"
RUN_FIX = "20260102T000000000000Z-fixed"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest-entries", type=int, default=1_000_000)
    parser.add_argument("--finished-images", type=int, default=100_000)
    parser.add_argument("--bucket-objects", type=int, default=5_000)
    parser.add_argument("--images-per-file", type=int, default=None,
                        help="images per committed file of the synthetic outputs (default: the job's default)")
    parser.add_argument("--segments-per-image", type=int, default=3)
    parser.add_argument("--compare-with", type=Path, default=None,
                        help="another checkout of this repository: its code is measured on the same data too")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child mode: one case
    parser.add_argument("--case-args", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Synthetic data (parent process)


def _uris(start: int, stop: int):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    numbers = np.arange(start, stop)
    shards = pa.array((numbers % 256).astype(str))
    names = pa.array(np.char.zfill(numbers.astype(str), 8))
    return pc.binary_join_element_wise(f"s3://{BUCKET}/photos/", shards, "/", names, ".jpg", "")


def _image_rows(uris, run_id: str, errors):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.records import IMAGES_SCHEMA

    count = len(uris)
    ok = pc.invert(errors)
    segments = pa.array(np.full(count, 1, np.int32))
    null_int = pa.nulls(count, pa.int32())
    return pa.table({
        "image_uri": uris, "image_id": pc.utf8_slice_codeunits(uris, len(f"s3://{BUCKET}/photos/")),
        "status": pc.if_else(ok, "ok", "error"),
        "height": pa.array(np.full(count, 480, np.int32)), "width": pa.array(np.full(count, 640, np.int32)),
        "panoptic_segments": pc.if_else(ok, segments, null_int), "instance_segments": pc.if_else(ok, segments, null_int),
        "semantic_segments": pc.if_else(ok, segments, null_int),
        "error_stage": pc.if_else(errors, "decode", pa.nulls(count, pa.string())),
        "error_type": pc.if_else(errors, "ImageDecodeError", pa.nulls(count, pa.string())),
        "error_message": pc.if_else(errors, "cannot identify image file", pa.nulls(count, pa.string())),
        "run_id": pa.array([run_id] * count, pa.string()),
    }, schema=IMAGES_SCHEMA)


def _segment_rows(images, per_image: int):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.records import SEGMENTS_SCHEMA

    ok = images.filter(pc.equal(images["status"], "ok"))
    repeat = pa.array(np.repeat(np.arange(ok.num_rows), per_image))
    base = ok.take(repeat)
    count = base.num_rows
    tasks = pa.array(np.tile(np.array(["panoptic", "instance", "semantic"])[np.arange(per_image) % 3], ok.num_rows))
    return pa.table({
        "image_uri": base["image_uri"], "image_id": base["image_id"], "height": base["height"],
        "width": base["width"], "task": tasks, "segment_id": pa.array(np.tile(np.arange(per_image, dtype=np.int32),
                                                                              ok.num_rows)),
        "label_id": pa.array(np.zeros(count, np.int32)), "label": pa.array(["thing"] * count),
        "score": pa.array(np.full(count, 0.9, np.float32)), "area": pa.array(np.full(count, 1000, np.int64)),
        "bbox": pa.FixedSizeListArray.from_arrays(pa.array(np.tile(np.float32([10, 20, 30, 40]), count)), 4),
        "rle_size": pa.FixedSizeListArray.from_arrays(pa.array(np.tile(np.int32([480, 640]), count)), 2),
        "rle_counts": pa.array(["Xc`06X;3M2N1O1N2M3L5J`0@Qc0"] * count), "was_fused": pa.array(np.zeros(count, bool)),
        "model": pa.array(["m2f-shapes-tiny"] * count), "run_id": base["run_id"],
    }, schema=SEGMENTS_SCHEMA)


def _write_output(output_uri: str, storage, images, *, images_per_file: int, segments_per_image: int) -> int:
    """Commits `images` in batches the way the write stage does; returns the number of batches."""
    from pipeline.sinks import batch_file_stem, write_batch

    def commit(offset: int) -> None:
        batch = images.slice(offset, images_per_file)
        stem = batch_file_stem(batch["run_id"][0].as_py(), batch["image_uri"].to_pylist())
        write_batch(output_uri, storage, stem, segments=_segment_rows(batch, segments_per_image), images=batch)

    offsets = range(0, images.num_rows, images_per_file)
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(commit, offsets))
    return len(offsets)


def build_data(args: argparse.Namespace, storage, codes: list[str]) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    filesystem, _ = storage.filesystem(f"s3://{BUCKET}")
    filesystem.mkdir(BUCKET)
    started = time.monotonic()
    uris = _uris(0, args.manifest_entries)
    manifest = pa.table({"image_uri": uris, "image_id": pc.utf8_slice_codeunits(uris, len(f"s3://{BUCKET}/"))})
    with filesystem.open(f"{BUCKET}/manifest-big.parquet", "wb") as handle:
        pq.write_table(manifest, handle)
    with filesystem.open(f"{BUCKET}/manifest-finished.parquet", "wb") as handle:
        pq.write_table(manifest.slice(0, args.finished_images), handle)

    half = uris.slice(0, args.manifest_entries // 2)
    errors = pa.array(np.arange(len(half)) % 100 == 37)  # 1% scattered error rows
    first = _image_rows(half, RUN_FIRST, errors)
    fixed = _image_rows(pc.filter(half, errors), RUN_FIX, pa.array(np.zeros(pc.sum(errors).as_py(), bool)))
    for code in codes:  # compaction changes it: one copy per code measured
        half_done = f"s3://{BUCKET}/out-half-{code}"
        batches = _write_output(half_done, storage, first, images_per_file=args.images_per_file,
                                segments_per_image=args.segments_per_image)
        batches += _write_output(half_done, storage, fixed, images_per_file=args.images_per_file,
                                 segments_per_image=args.segments_per_image)

    finished = f"s3://{BUCKET}/out-finished"
    finished_rows = _image_rows(uris.slice(0, args.finished_images), RUN_FIRST,
                                pa.array(np.zeros(args.finished_images, bool)))
    finished_batches = _write_output(finished, storage, finished_rows, images_per_file=args.images_per_file,
                                     segments_per_image=args.segments_per_image)

    objects = {f"{BUCKET}/bucket/p{i % 16:02d}/{i:07d}.jpg": b"x" for i in range(args.bucket_objects)}
    keys = list(objects)
    for offset in range(0, len(keys), 1000):
        filesystem.pipe({k: objects[k] for k in keys[offset:offset + 1000]})
    return {"build_s": round(time.monotonic() - started, 1), "half_done_batches": batches,
            "finished_batches": finished_batches, "superseded_error_rows": len(fixed)}


# ----------------------------------------------------------------------------------------------
# Cases (child process)


def _peak_rss_mib() -> float:
    """VmHWM: unlike ru_maxrss, it starts afresh at exec instead of carrying over the parent's peak."""
    peak_kib = status_kib("VmHWM")
    if peak_kib is None:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak_kib / 1024, 1)


def _count_files(storage, output_uri: str) -> dict:
    filesystem, root = storage.filesystem(output_uri)
    filesystem.invalidate_cache()
    return {table: len([p for p in filesystem.ls(f"{root}/{table}", detail=False)
                        if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith((".", "_"))])
            for table in ("images", "segments")}


def measure(case: str, case_args: dict) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.storage import StorageConfig

    storage = StorageConfig.resolve(case_args["storage_options"], environ={})
    result: dict = {"case": case}
    if case == "listing_and_resume_check":
        from pipeline.listing import list_inputs
        from pipeline.resume import compact, done_image_uris

        started = time.monotonic()
        listed = list_inputs(f"s3://{BUCKET}/manifest-big.parquet", storage)
        listed_at = time.monotonic()
        compaction = compact(case_args["half_done"], storage)
        compacted_at = time.monotonic()
        done = done_image_uris(compaction.images)
        done = done if isinstance(done, pa.Array) else pa.array(sorted(done), pa.string())  # older code: a set
        pending = listed.filter(pc.invert(pc.is_in(listed["image_uri"], value_set=done)))
        finished = time.monotonic()
        result.update(entries=listed.num_rows, pending=pending.num_rows, listing_s=round(listed_at - started, 2),
                      compaction_s=round(compacted_at - listed_at, 2), anti_join_s=round(finished - compacted_at, 2),
                      listing_plus_resume_check_s=round(finished - started, 2),
                      rewritten_batches=len(compaction.rewritten_stems),
                      files_after=_count_files(storage, case_args["half_done"]))
    elif case == "noop_resume":
        from pipeline import run_segmentation
        from pipeline.listing import list_inputs
        from pipeline.resume import compact

        # The job's own bookkeeping alone first (listing + compaction), then the whole job, which also
        # validates the model (importing torch: seconds of it on a loaded machine) and writes report.json.
        started = time.monotonic()
        list_inputs(f"s3://{BUCKET}/manifest-finished.parquet", storage)
        compact(f"s3://{BUCKET}/out-finished", storage)
        result["listing_and_compaction_s"] = round(time.monotonic() - started, 2)
        started = time.monotonic()
        report = run_segmentation({"input": f"s3://{BUCKET}/manifest-finished.parquet",
                                   "output": f"s3://{BUCKET}/out-finished", "resume": True,
                                   "storage_options": case_args["storage_options"], "show_progress": False})
        result.update(wall_s=round(time.monotonic() - started, 2), skipped=report["skipped_already_ok"],
                      processed=report["processed"], output_images=report["output_totals"]["images"],
                      files=_count_files(storage, f"s3://{BUCKET}/out-finished"))
    elif case == "bucket_listing":
        from pipeline.listing import list_inputs

        started = time.monotonic()
        listed = list_inputs(f"s3://{BUCKET}/bucket/", storage)
        elapsed = time.monotonic() - started
        result.update(objects=listed.num_rows, listing_s=round(elapsed, 2),
                      objects_per_s=round(listed.num_rows / elapsed) if elapsed > 0 else None)
    else:
        raise ValueError(f"unknown case {case}")
    result["peak_rss_mib"] = _peak_rss_mib()
    return result


def run_case(case: str, case_args: dict, code_root: Path) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(code_root)}
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", case, "--case-args", json.dumps(case_args)]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, cwd=code_root)
    if completed.returncode != 0:
        return {"case": case, "failed": completed.stderr[-3000:]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, json.loads(args.case_args))))
        return 0
    from infra.local_stack import start_s3_endpoint, stop_s3_endpoint
    from pipeline.sinks import DEFAULT_IMAGES_PER_FILE
    from pipeline.storage import StorageConfig

    args.images_per_file = args.images_per_file or DEFAULT_IMAGES_PER_FILE
    results: dict = {"args": {k: str(v) for k, v in vars(args).items() if k not in ("measure", "case_args")}}
    with tempfile.TemporaryDirectory() as log_dir:
        endpoint = start_s3_endpoint(log_dir=log_dir)
        try:
            storage_options = endpoint.storage_options()
            storage = StorageConfig.resolve(storage_options, environ={})
            codes = {"this": REPO_ROOT, **({"other": args.compare_with.resolve()} if args.compare_with else {})}
            results["data"] = build_data(args, storage, list(codes))
            print("data:", json.dumps(results["data"]), flush=True)
            for case in ("listing_and_resume_check", "noop_resume", "bucket_listing"):
                for name, root in codes.items():
                    measured = run_case(case, {"storage_options": storage_options,
                                               "half_done": f"s3://{BUCKET}/out-half-{name}"}, root)
                    measured["load_average"] = [round(v, 1) for v in os.getloadavg()]
                    results.setdefault(name, {})[case] = measured
                    print(f"{name:5s} {json.dumps(measured)}", flush=True)
        finally:
            stop_s3_endpoint(endpoint)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
