"""The labeling job: list -> read -> decode+preprocess -> model -> post-process+write, then compact and report.

`run_segmentation(options)` is the whole job as a function (the CLI `jobs/segment_bucket.py` and the
throughput benchmark both call it). It joins the Ray cluster it finds (an initialised Ray, `--ray-address`
or RAY_ADDRESS as set by `ray job submit`), or starts an embedded one bound to 127.0.0.1.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.checkpoint import TORCH_DTYPES
from pipeline.cli import POSTPROCESS_DEFAULTS, label_ids_argument, tasks_argument
from pipeline.decode import DEFAULT_MAX_IMAGE_PIXELS
from pipeline.device_postprocess import PostprocessSettings
from pipeline.inference import COMPILE_PROGRESS_KEY, CONCURRENT_CALLS, InferenceStage, default_batch_size
from pipeline.listing import IMAGE_EXTENSIONS, list_inputs
from pipeline.local_ray import REPO_ROOT, connect_ray
from pipeline.overlays import OVERLAYS_DIR, write_overlays
from pipeline.model_spec import ModelSpec, resolve_model
from pipeline.pools import MODEL_ACTOR_ENV_VARS, PoolPlan, alive_nodes, plan_pools
from pipeline.postprocess import PostprocessStage
from pipeline.preprocess import PreprocessStage
from pipeline.progress import StallWatchdog, start_progress_tracker
from pipeline.read import DEFAULT_MAX_OBJECT_BYTES, read_objects
from pipeline.records import SEGMENTS_SCHEMA, TASKS
from pipeline.report import RESULT_COLUMNS, ResultTally, output_totals
from pipeline.resume import BOOKKEEPING_COLUMNS, CompactionResult, compact, done_image_uris
from pipeline.sinks import (DEFAULT_IMAGES_PER_FILE, IMAGES_DIR, SEGMENTS_DIR, list_stems, read_table_files,
                            write_json)
from pipeline.storage import StorageConfig, is_local_uri, join_uri

__all__ = ["REPO_ROOT", "SegmentationOptions", "OutputNotEmptyError", "run_segmentation", "new_run_id"]

logger = logging.getLogger(__name__)

_MAX_INPUT_BLOCKS = 2000


class OutputNotEmptyError(RuntimeError):
    """--output already holds a labeling run and neither --resume nor --overwrite was given."""


@dataclass
class SegmentationOptions:
    """Everything the job takes; field names match the CLI flags (`--mask-threshold` -> mask_threshold)."""

    input: str = str(REPO_ROOT / "samples")
    output: str = str(REPO_ROOT / "out" / "samples-run")
    model: str = str(REPO_ROOT / "models" / "m2f-shapes-tiny")
    tasks: tuple[str, ...] = TASKS
    threshold: float = POSTPROCESS_DEFAULTS["threshold"]
    mask_threshold: float = POSTPROCESS_DEFAULTS["mask_threshold"]
    overlap_threshold: float = POSTPROCESS_DEFAULTS["overlap_threshold"]
    label_ids_to_fuse: tuple[int, ...] = ()
    batch_size: int | None = None  # None: chosen for the device (16 on a GPU, 4 on CPU)
    preprocess_actors: int | None = None
    model_actors: int | None = None
    postprocess_actors: int | None = None
    dtype: str | None = None  # None: bfloat16 on a GPU, float32 on CPU
    compile: bool = False  # torch.compile the model in each model actor (compile time in the report)
    limit: int | None = None
    resume: bool = False
    overwrite: bool = False
    storage_options: dict | str | None = None
    overlays: int = 0
    stall_timeout: float = 600.0
    ray_address: str | None = None
    images_per_file: int = DEFAULT_IMAGES_PER_FILE
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    show_progress: bool = True

    def validated(self) -> "SegmentationOptions":
        """Checked and normalised options: absolute local paths, typed tasks and label ids (comma strings, as
        a dict from Python may hold them, are parsed like the CLI's), thresholds in [0, 1]."""
        tasks = tasks_argument(self.tasks) if isinstance(self.tasks, str) else tuple(self.tasks)
        PostprocessSettings(tasks=tasks)  # raises on unknown tasks
        fuse = label_ids_argument(self.label_ids_to_fuse) if isinstance(self.label_ids_to_fuse, str) \
            else tuple(int(i) for i in self.label_ids_to_fuse)
        for name in POSTPROCESS_DEFAULTS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} {value} is outside [0, 1]; it is compared with "
                                 "probabilities")
        if self.dtype is not None and self.dtype not in TORCH_DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: choose one of {', '.join(TORCH_DTYPES)}")
        if (self.batch_size is not None and self.batch_size < 1) or self.images_per_file < 1:
            raise ValueError("--batch-size and --images-per-file must be at least 1")
        if self.limit is not None and self.limit < 0:
            raise ValueError("--limit must be 0 or more")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; pass one")
        output = os.path.abspath(self.output) if is_local_uri(self.output) and "://" not in self.output \
            else self.output
        model = os.path.abspath(self.model) if "://" not in self.model else self.model
        return replace(self, tasks=tasks, output=output, model=model, label_ids_to_fuse=fuse)


def new_run_id() -> str:
    """Sortable by start time (resume's tie-breaker), unique across concurrent starts."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]


def run_segmentation(options: SegmentationOptions | dict) -> dict:
    """Runs the labeling job and returns its report (also written to <output>/report.json).

    `options` is a SegmentationOptions or a dict of its fields.
    """
    started = time.monotonic()
    if isinstance(options, dict):
        options = SegmentationOptions(**options)
    options = options.validated()
    storage = StorageConfig.resolve(options.storage_options)
    run_id = new_run_id()
    spec = resolve_model(options.model, storage)  # fails at once on a broken model
    _prepare_output(options, storage)

    listed = list_inputs(options.input, storage, extensions=options.extensions, limit=options.limit)
    if listed.num_rows == 0:
        logger.warning("no images under %s (extensions: %s)", options.input, ", ".join(options.extensions))
    bookkeeping_columns = (*BOOKKEEPING_COLUMNS, "image_id") if options.overlays else BOOKKEEPING_COLUMNS
    previous = compact(options.output, storage, bookkeeping_columns) if options.resume else None
    done = done_image_uris(previous.images) if previous is not None else None
    pending = listed.filter(pc.invert(pc.is_in(listed["image_uri"], value_set=done))) \
        if done is not None and len(done) else listed
    logger.info("run %s: %d inputs listed, %d already done, %d to label", run_id, listed.num_rows,
                listed.num_rows - pending.num_rows, pending.num_rows)

    plan, tally, pipeline_started, pipeline_seconds, model_stats = None, ResultTally(), 0.0, 0.0, {}
    if pending.num_rows:
        started_ray = connect_ray(options.ray_address)
        try:
            plan = plan_pools(alive_nodes(ray.nodes()), preprocess_actors=options.preprocess_actors,
                              model_actors=options.model_actors, postprocess_actors=options.postprocess_actors)
            pipeline_started = time.monotonic()
            tally = _run_pipeline(pending, options, storage, plan, run_id, spec, model_stats)
            pipeline_seconds = time.monotonic() - pipeline_started
        finally:
            if started_ray:
                ray.shutdown()

    # A run that labeled nothing changed nothing: the compaction it started with still describes the output.
    final = previous if previous is not None and not pending.num_rows \
        else compact(options.output, storage, bookkeeping_columns)
    overlay_uris = _write_overlays(options, storage, final) if options.overlays else []
    wall = time.monotonic() - started
    report = _build_report(options, storage, run_id, spec.id2label, plan, listed, pending, tally,
                           final.images, wall, pipeline_started, pipeline_seconds, overlay_uris)
    report.update(model_id=spec.model_id, **model_stats)
    report["report_uri"] = write_json(options.output, storage, "report.json", json.dumps(report, indent=2))
    return report


def _prepare_output(options: SegmentationOptions, storage: StorageConfig) -> None:
    filesystem, root = storage.filesystem(options.output)
    if options.overwrite:
        for name in (SEGMENTS_DIR, IMAGES_DIR, OVERLAYS_DIR):
            path = f"{root.rstrip('/')}/{name}"
            if filesystem.exists(path):
                filesystem.rm(path, recursive=True)
        return
    if not options.resume and list_stems(options.output, storage, IMAGES_DIR):
        raise OutputNotEmptyError(
            f"--output {options.output} already holds a labeling run; pass --resume to finish it (images "
            "recorded as 'ok' are skipped) or --overwrite to start over, or choose another --output")


def _input_blocks(pending: pa.Table, batch_size: int) -> list[pa.Table]:
    """The listing cut into blocks so that every actor gets work from the start (one block = one read task)."""
    rows_per_block = max(batch_size, math.ceil(pending.num_rows / _MAX_INPUT_BLOCKS))
    return [pending.slice(offset, rows_per_block) for offset in range(0, pending.num_rows, rows_per_block)]


def _run_pipeline(pending: pa.Table, options: SegmentationOptions, storage: StorageConfig, plan: PoolPlan,
                  run_id: str, spec: ModelSpec, model_stats: dict) -> ResultTally:
    """Runs the Ray Data chain over `pending` and returns the counts of the images rows the writers committed.

    Fills `model_stats` with what the model actors report (batch size, compile time)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = options.show_progress
    tracker = start_progress_tracker()
    settings = PostprocessSettings(tasks=options.tasks, threshold=options.threshold,
                                   mask_threshold=options.mask_threshold,
                                   overlap_threshold=options.overlap_threshold,
                                   label_ids_to_fuse=options.label_ids_to_fuse)
    batch_size = options.batch_size or default_batch_size(bool(plan.model_gpus))
    model_stats["batch_size"] = batch_size
    model_resources = {"num_cpus": plan.model_cpus,
                       "memory": _model_actor_memory(spec, batch_size, with_gpu=bool(plan.model_gpus),
                                                     model_actors=plan.model_actors),
                       "runtime_env": {"env_vars": MODEL_ACTOR_ENV_VARS}}
    if plan.model_gpus:
        model_resources["num_gpus"] = plan.model_gpus

    dataset = (
        ray.data.from_arrow(_input_blocks(pending, batch_size))
        .map_batches(read_objects, batch_format="pyarrow", batch_size=batch_size,
                     num_cpus=plan.read_task_cpus,
                     fn_kwargs={"storage": storage, "max_object_bytes": options.max_object_bytes,
                                "tracker": tracker})
        .map_batches(PreprocessStage, batch_format="pyarrow", batch_size=batch_size,
                     compute=ray.data.ActorPoolStrategy(size=plan.preprocess_actors),
                     num_cpus=plan.preprocess_cpus,
                     fn_constructor_kwargs={"spec": spec, "max_image_pixels": options.max_image_pixels,
                                            "torch_threads": 1, "tracker": tracker})
        .map_batches(InferenceStage, batch_format="pyarrow", batch_size=batch_size,
                     compute=ray.data.ActorPoolStrategy(size=plan.model_actors, enable_true_multi_threading=True,
                                                        max_concurrent_calls_per_actor=CONCURRENT_CALLS),
                     **model_resources,
                     fn_constructor_kwargs={"spec": spec, "storage": storage, "settings": settings,
                                            "dtype": options.dtype, "compile": options.compile,
                                            "torch_threads": plan.model_torch_threads, "tracker": tracker})
        .map_batches(PostprocessStage, batch_format="pyarrow", batch_size=options.images_per_file,
                     compute=ray.data.ActorPoolStrategy(size=plan.postprocess_actors),
                     num_cpus=plan.postprocess_cpus,
                     fn_constructor_kwargs={"spec": spec, "storage": storage, "output_uri": options.output,
                                            "tasks": options.tasks, "run_id": run_id, "tracker": tracker})
    )
    watchdog = StallWatchdog(tracker, expected=pending.num_rows, stall_timeout=options.stall_timeout)
    watchdog.start()
    tally = ResultTally()
    failures: list[BaseException] = []

    def collect_results() -> None:
        try:
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                tally.add(batch.select(list(RESULT_COLUMNS)), time.monotonic())
        except BaseException as error:  # noqa: BLE001 - re-raised in the driver's thread below
            failures.append(error)

    # Results are collected on a thread of their own so the driver can give up on a stall: an interrupt
    # aimed at a thread blocked inside Ray Data is not reliably delivered (a SIGINT handler set to
    # SIG_IGN by anything in the process silently drops it).
    collector = threading.Thread(target=collect_results, name="m2f-results", daemon=True)
    collector.start()
    try:
        while collector.is_alive():
            collector.join(timeout=1.0)
            if watchdog.failure is not None:
                raise watchdog.failure
    finally:
        watchdog.stop()
    if failures:
        raise failures[0]
    counts, _ = ray.get(tracker.snapshot.remote())
    if COMPILE_PROGRESS_KEY in counts:
        model_stats["compile_s"] = round(counts[COMPILE_PROGRESS_KEY] / 1000, 3)
    return tally


def _model_actor_memory(spec: ModelSpec, batch_size: int, *, with_gpu: bool, model_actors: int) -> int:
    """Host memory a model actor declares to Ray (bytes), so its memory monitor expects what the actor uses.

    Weights twice (loaded, then moved or cast), the torch runtime (~1.5 GiB, CUDA context included) and,
    on CPU, activations of the forward pass and post-processing (~0.6 GiB per 800x1088 image for Swin-T:
    3.9-4.2 GiB peak RSS at batch 4, measured 2026-12-01); never more than half
    the cluster's memory per actor, so the request cannot make the actor unschedulable on a small machine.
    """
    gib = 1024 ** 3
    wanted = 2 * spec.weights_bytes + int(1.5 * gib) + (0 if with_gpu else int(0.6 * gib) * batch_size)
    available = ray.cluster_resources().get("memory", wanted * model_actors * 2)
    return int(min(wanted, available / (2 * model_actors)))


def _write_overlays(options: SegmentationOptions, storage: StorageConfig, final: CompactionResult) -> list[str]:
    ok_positions = pc.indices_nonzero(pc.equal(final.images["status"], "ok"))
    by_image_id = pc.sort_indices(pc.take(final.images["image_id"], ok_positions))
    chosen_positions = pc.take(ok_positions, by_image_id.slice(0, options.overlays))
    chosen = final.images.take(chosen_positions)
    stems = sorted(set(final.stems_of(chosen_positions)))
    segments = pa.concat_tables([table.cast(SEGMENTS_SCHEMA) for table in
                                 read_table_files(options.output, storage, SEGMENTS_DIR, stems)]) \
        if stems else SEGMENTS_SCHEMA.empty_table()
    return write_overlays(options.output, storage, chosen, segments, count=options.overlays, tasks=options.tasks)


def _build_report(options: SegmentationOptions, storage: StorageConfig, run_id: str, id2label: dict,
                  plan: PoolPlan | None, listed: pa.Table, pending: pa.Table, tally: ResultTally, final: pa.Table,
                  wall: float, pipeline_started: float, pipeline_seconds: float, overlay_uris: list[str]) -> dict:
    args = {k: v for k, v in asdict(options).items() if k != "storage_options"}
    args["storage_options"] = storage.redacted()
    args["tasks"] = list(options.tasks)
    return {
        "run_id": run_id,
        "input": options.input,
        "output": options.output,
        "model": options.model,
        "labels": {str(k): v for k, v in sorted(id2label.items())},
        "inputs_seen": listed.num_rows,
        "skipped_already_ok": listed.num_rows - pending.num_rows,
        "processed": tally.processed,
        "ok": tally.ok,
        "errors": tally.errors,
        "errors_by_stage": tally.errors_by_stage,
        "segments": {task: tally.segments[task] for task in options.tasks},
        "wall_time_s": round(wall, 3),
        "images_per_s": round(tally.processed / wall, 4) if wall > 0 else None,
        # The Ray Data part alone: actor start-up included, model validation/listing/compaction not.
        "pipeline_wall_time_s": round(pipeline_seconds, 3),
        "pipeline_images_per_s": round(tally.processed / pipeline_seconds, 4) if pipeline_seconds > 0 else None,
        **tally.steady_state(pipeline_started, pipeline_seconds),
        "output_totals": output_totals(final),
        "tables": {"segments": join_uri(options.output, SEGMENTS_DIR), "images": join_uri(options.output, IMAGES_DIR)},
        "overlays": overlay_uris,
        "pools": plan.as_dict() if plan is not None else None,
        "args": args,
    }
