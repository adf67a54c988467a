"""Post-processing where the logits are: every requested task for a batch, then column-major run lengths.

`segment_batch` turns a batch of model outputs (on any device) into each image's segments at its original
size: m2f_model's `post_process_tasks` on each image (one upsampling shared by the tasks; transformers'
semantics, unique panoptic ids), then the COCO run lengths of every kept mask, computed on the same device from the label
maps and instance masks. Only the run tables (a few hundred kilobytes per image) reach the host; dense
masks never do. The masks the run lengths describe are exactly those of m2f_model's three post-processors
for the same logits on the same device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from m2f_model.post_processing import nearest_source_indices, post_process_tasks
from pipeline.records import TASKS

__all__ = ["PostprocessSettings", "ImageSegments", "segment_batch", "segments_on_device", "segments_from_run_table"]


@dataclass(frozen=True)
class PostprocessSettings:
    """The post-processors' knobs (transformers' names and defaults) and which tasks to produce."""

    tasks: tuple[str, ...] = TASKS
    threshold: float = 0.5
    mask_threshold: float = 0.5
    overlap_threshold: float = 0.8
    label_ids_to_fuse: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"--tasks {','.join(self.tasks)!r}: choose one or more of {','.join(TASKS)}")


@dataclass
class ImageSegments:
    """One image's segments of every task; the lists run in parallel, one entry per segment."""

    height: int
    width: int
    task: list[str] = field(default_factory=list)
    segment_id: list[int] = field(default_factory=list)
    label_id: list[int] = field(default_factory=list)
    score: list[float | None] = field(default_factory=list)  # None for semantic segments
    was_fused: list[bool] = field(default_factory=list)
    run_lengths: list[np.ndarray] = field(default_factory=list)  # uint32, column-major, first run = zeros

    def add(self, task: str, segment_id: int, label_id: int, score: float | None, was_fused: bool,
            run_lengths: np.ndarray) -> None:
        self.task.append(task)
        self.segment_id.append(segment_id)
        self.label_id.append(label_id)
        self.score.append(score)
        self.was_fused.append(was_fused)
        self.run_lengths.append(run_lengths)


def segment_batch(class_logits: torch.Tensor, mask_logits: torch.Tensor, target_sizes: list[tuple[int, int]],
                  settings: PostprocessSettings) -> list[ImageSegments]:
    """A batch of model outputs -> each image's segments of every requested task at its `target_sizes` entry.

    Each image's segments equal what m2f_model's three post-processors give for that image's logits alone.

    class_logits: (batch, queries, labels + 1); mask_logits: (batch, queries, h, w); float32, any device.
    Panoptic: one segment per id (a fused id keeps its best score); instance: each kept mask whole (they may
    overlap); semantic: one segment per class present (segment id = label id, no score).
    """
    results, run_table = segments_on_device(class_logits, mask_logits, target_sizes, settings)
    return segments_from_run_table(results, run_table, target_sizes)


def segments_on_device(class_logits: torch.Tensor, mask_logits: torch.Tensor, target_sizes: list[tuple[int, int]],
                       settings: PostprocessSettings) -> tuple[list[dict], "_RunTable"]:
    """`segment_batch`'s device part: every task's post-processing, then the run tables of every map, brought
    to the host in one copy. Returns the post-processors' results (segments_info; maps stay on the device)."""
    # Image by image, so an image's segments never depend on its batch mates (the semantic einsum's rounding
    # depends on the batch shape): they equal single-image inference + post-processing.
    results = [post_process_tasks(
        SimpleNamespace(class_queries_logits=class_logits[index:index + 1],
                        masks_queries_logits=mask_logits[index:index + 1]), settings.tasks,
        threshold=settings.threshold, mask_threshold=settings.mask_threshold,
        overlap_mask_area_threshold=settings.overlap_threshold, label_ids_to_fuse=set(settings.label_ids_to_fuse),
        target_sizes=[size],
        # transformers' numbering can give the segment after a reused fused id an id already taken by another
        # label; the map could then not tell the two apart.
        unique_segment_ids=True,
        # instance masks stay at the working size; their runs at the target size are read off them below
        instance_masks_at_working_size=True)[0] for index, size in enumerate(target_sizes)]
    # Run tables of every map of the batch, then one copy to the host.
    tables = []  # per image: runs of [panoptic + semantic label maps], then of [instance masks]
    for (height, width), result in zip(target_sizes, results):
        label_maps = [result[task] if task == "semantic" else result[task]["segmentation"]
                      for task in ("panoptic", "semantic") if task in result]
        tables.append(_run_table(torch.stack([m.to(torch.int32) for m in label_maps]) if label_maps
                                 else torch.zeros((0, height, width), dtype=torch.int32, device=class_logits.device)))
        masks = result["instance"]["masks"] if "instance" in result \
            else torch.zeros((0, height, width), dtype=torch.uint8, device=class_logits.device)
        tables.append(_run_table(masks) if tuple(masks.shape[1:]) == (height, width)
                      else _upsampled_run_table(masks, (height, width)))
    host = torch.cat(tables).cpu().numpy() if tables else np.zeros((0, 3), np.int32)
    return results, _RunTable(host, np.cumsum([0] + [len(t) for t in tables]))


@dataclass
class _RunTable:
    """The host copy of a batch's run tables: rows (map index, start, value); per image two tables in turn
    (its panoptic/semantic label maps, then its instance masks), `bounds` delimiting them."""

    rows: np.ndarray
    bounds: np.ndarray


def segments_from_run_table(results: list[dict], run_table: _RunTable,
                            target_sizes: list[tuple[int, int]]) -> list[ImageSegments]:
    """`segment_batch`'s host part: each image's segments and their COCO run lengths from the run table."""
    host, bounds = run_table.rows, run_table.bounds
    segments = []
    for index, ((height, width), result) in enumerate(zip(target_sizes, results)):
        label_runs = _MapRuns(host[bounds[2 * index]:bounds[2 * index + 1]], height * width)
        mask_counts = _binary_mask_counts(host[bounds[2 * index + 1]:bounds[2 * index + 2]], height * width)
        image = ImageSegments(height=height, width=width)
        map_index = 0
        if "panoptic" in result:
            _add_panoptic(image, result["panoptic"]["segments_info"], label_runs, map_index)
            map_index += 1
        if "instance" in result:
            for position, info in enumerate(result["instance"]["segments_info"]):
                image.add("instance", int(info["id"]), int(info["label_id"]), float(info["score"]),
                          bool(info.get("was_fused", False)), mask_counts[position])
        if "semantic" in result:
            for label_id in label_runs.values(map_index):  # one segment per class present; segment_id = label_id
                image.add("semantic", label_id, label_id, None, False, label_runs.of(map_index, label_id))
        segments.append(image)
    return segments


def _add_panoptic(image: ImageSegments, segments_info: list[dict], runs: "_MapRuns", map_index: int) -> None:
    # Fused stuff segments appear once per fused query under the same id: one row per id, best score.
    by_id: dict[int, dict] = {}
    for info in segments_info:
        kept = by_id.setdefault(int(info["id"]), dict(info))
        kept["score"] = max(float(kept["score"]), float(info["score"]))
        kept["was_fused"] = bool(kept.get("was_fused")) or bool(info.get("was_fused"))
    for segment_id, info in by_id.items():
        image.add("panoptic", segment_id, int(info["label_id"]), float(info["score"]),
                  bool(info.get("was_fused", False)), runs.of(map_index, segment_id))


def _run_table(maps: torch.Tensor) -> torch.Tensor:
    """(M, H, W) maps -> (R, 3) int32 rows (map index, column-major start, value), one per run of equal values."""
    flat = maps.transpose(1, 2).reshape(maps.shape[0], maps.shape[1] * maps.shape[2])  # (M, W*H), column-major
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[:, 1:] = flat[:, 1:] != flat[:, :-1]
    map_index, start = starts.nonzero(as_tuple=True)
    return torch.stack([map_index.to(torch.int32), start.to(torch.int32), flat[map_index, start].to(torch.int32)],
                       dim=1)


def _upsampled_run_table(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`_run_table` of the nearest-neighbour upsampling of (K, h, w) masks to `size` (each side >= the masks'),
    computed from the small masks: half the pixels and no upsampled copy at 384x384 -> 480x640.

    Target pixel (y, x) reads source (rows[y], columns[x]); with upsampling every source row and column is read.
    Along a target column a run starts where the source column changes between rows r-1 and r, at the first
    target row reading r; a target column's first pixel starts a run when it differs from the previous target
    column's last pixel (always at the first column). Target columns reading the same source column repeat
    its runs.
    """
    device = masks.device
    count, height, width = masks.shape
    out_height, out_width = size
    rows = nearest_source_indices(height, out_height, device)  # (H,)
    columns = nearest_source_indices(width, out_width, device)  # (W,)
    first_row = torch.searchsorted(rows, torch.arange(height, device=device))  # first target row reading row r
    by_column = masks.transpose(1, 2).contiguous()  # (K, w, h): source columns
    # changes inside source columns: (mask, source column, source row r >= 1)
    mask_of, column_of, row_of = (by_column[:, :, 1:] != by_column[:, :, :-1]).nonzero(as_tuple=True)
    row_of = row_of + 1
    per_source_column = torch.bincount(mask_of * width + column_of, minlength=count * width).view(count, width)
    first_change = (torch.cumsum(per_source_column.flatten(), 0) - per_source_column.flatten()).view(count, width)
    inner = per_source_column[:, columns]  # (K, W): changes inside each target column
    inner_start = first_change[:, columns]  # (K, W): where they are listed
    top, bottom = by_column[:, columns, 0], by_column[:, columns, height - 1]  # (K, W) first / last pixel values
    column_start = torch.ones((count, out_width), dtype=torch.bool, device=device)
    column_start[:, 1:] = top[:, 1:] != bottom[:, :-1]
    runs = (column_start.to(torch.int64) + inner).flatten()  # runs starting in each (mask, target column)
    offset = torch.cumsum(runs, 0) - runs
    table = torch.empty((int(runs.sum()), 3), dtype=torch.int32, device=device)
    # runs starting at a target column's top
    start_mask, start_column = column_start.nonzero(as_tuple=True)
    at = offset.view(count, out_width)[start_mask, start_column]
    table[at, 0] = start_mask.to(torch.int32)
    table[at, 1] = (start_column * out_height).to(torch.int32)
    table[at, 2] = top[start_mask, start_column].to(torch.int32)
    # runs starting inside target columns: each target column lists its source column's changes
    inner_flat = inner.flatten()
    owner = torch.repeat_interleave(torch.arange(count * out_width, device=device), inner_flat)
    within = torch.arange(owner.numel(), device=device) - (torch.cumsum(inner_flat, 0) - inner_flat)[owner]
    change = inner_start.flatten()[owner] + within
    target_mask, target_column = owner // out_width, owner % out_width
    at = offset[owner] + column_start.flatten()[owner].to(torch.int64) + within
    table[at, 0] = target_mask.to(torch.int32)
    table[at, 1] = (target_column * out_height + first_row[row_of[change]]).to(torch.int32)
    table[at, 2] = by_column[mask_of[change], column_of[change], row_of[change]].to(torch.int32)
    return table


def _binary_mask_counts(table: np.ndarray, pixels: int) -> list[np.ndarray]:
    """The run table of a stack of 0/1 masks -> each mask's COCO run lengths, all masks at once.

    In a binary mask consecutive runs alternate between 0 and 1, so its COCO counts are simply its run
    lengths, after a 0 when it starts with ones (equal to `_MapRuns.of(mask, 1)`, without a pass per mask).
    """
    if len(table) == 0:
        return []
    maps, starts = table[:, 0], table[:, 1].astype(np.int64)
    first_row = np.ones(len(table), dtype=bool)
    first_row[1:] = maps[1:] != maps[:-1]
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[np.append(first_row[1:], True)] = pixels  # a mask's last run ends with the image
    lengths = (ends - starts).astype(np.uint32)
    leading_zero = np.flatnonzero(first_row & (table[:, 2] == 1))
    counts = np.insert(lengths, leading_zero, 0)
    map_starts = np.flatnonzero(first_row)
    return np.split(counts, (map_starts + np.searchsorted(leading_zero, map_starts))[1:])


class _MapRuns:
    """The host copy of one run table: runs of each map, and COCO run lengths of `map == value`."""

    def __init__(self, table: np.ndarray, pixels: int) -> None:
        self._pixels = pixels
        self._by_map: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        if len(table) == 0:
            return
        split = np.flatnonzero(np.diff(table[:, 0])) + 1  # rows arrive grouped by map, starts ascending
        for rows in np.split(table, split):
            starts = rows[:, 1].astype(np.int64)
            lengths = np.diff(np.append(starts, pixels))
            self._by_map[int(rows[0, 0])] = (starts, lengths, rows[:, 2])

    def values(self, map_index: int) -> list[int]:
        return [int(v) for v in np.unique(self._by_map[map_index][2])]

    def of(self, map_index: int, value: int) -> np.ndarray:
        """Column-major run lengths of `map == value`, first run counting zeros."""
        starts, lengths, values = self._by_map[map_index]
        chosen = values == value
        one_starts, one_lengths = starts[chosen], lengths[chosen]
        if one_starts.size == 0:
            return np.array([self._pixels], dtype=np.uint32)
        counts = np.empty(2 * one_starts.size + 1, dtype=np.int64)
        counts[0] = one_starts[0]
        counts[1::2] = one_lengths
        counts[2:-1:2] = one_starts[1:] - (one_starts[:-1] + one_lengths[:-1])
        counts[-1] = self._pixels - (one_starts[-1] + one_lengths[-1])
        if counts[-1] == 0:  # pycocotools' own encoding ends with the last run, never with an empty one
            counts = counts[:-1]
        return counts.astype(np.uint32)
