"""Post-processing where the logits are: every requested task for a batch, then column-major run lengths.

`segment_batch` turns a batch of model outputs (on any device) into each image's segments at its original
size: m2f_model's `post_process_tasks` on each image (one upsampling shared by the tasks; transformers'
semantics, unique panoptic ids), then the COCO run lengths, area and box of every kept mask, computed on the same
device from the label maps and instance masks. Only those (a few hundred kilobytes per image) reach the host, in
one copy per batch, every segment's in turn; dense masks never do. The masks the run lengths describe are exactly
those of m2f_model's three post-processors for the same logits on the same device; areas and boxes are
pycocotools' own for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from m2f_model.post_processing import nearest_source_indices, post_process_tasks
from pipeline.records import TASKS

__all__ = ["PostprocessSettings", "ImageSegments", "segment_batch", "segments_on_device", "segments_from_counts"]


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
    # every segment's COCO run lengths (uint32, column-major, first run = zeros) in turn; `runs`: how many each
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    runs: list[int] = field(default_factory=list)
    area: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (segments,) pixels
    bbox: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))  # (segments, 4) COCO x, y, w, h

    def add(self, task: str, segment_id: int, label_id: int, score: float | None, was_fused: bool) -> None:
        self.task.append(task)
        self.segment_id.append(segment_id)
        self.label_id.append(label_id)
        self.score.append(score)
        self.was_fused.append(was_fused)

    @property
    def run_lengths(self) -> list[np.ndarray]:
        """Each segment's own run lengths (views into `counts`)."""
        bounds = np.cumsum([0] + self.runs)
        return [self.counts[bounds[k]:bounds[k + 1]] for k in range(len(self.runs))]


def segment_batch(class_logits: torch.Tensor, mask_logits: torch.Tensor, target_sizes: list[tuple[int, int]],
                  settings: PostprocessSettings) -> list[ImageSegments]:
    """A batch of model outputs -> each image's segments of every requested task at its `target_sizes` entry.

    Each image's segments equal what m2f_model's three post-processors give for that image's logits alone.

    class_logits: (batch, queries, labels + 1); mask_logits: (batch, queries, h, w); float32, any device.
    Panoptic: one segment per id (a fused id keeps its best score); instance: each kept mask whole (they may
    overlap); semantic: one segment per class present (segment id = label id, no score).
    """
    results, counts = segments_on_device(class_logits, mask_logits, target_sizes, settings)
    return segments_from_counts(results, counts, target_sizes)


def segments_on_device(class_logits: torch.Tensor, mask_logits: torch.Tensor, target_sizes: list[tuple[int, int]],
                       settings: PostprocessSettings) -> tuple[list[dict], "_HostCounts"]:
    """`segment_batch`'s device part: every task's post-processing, then every segment's COCO run lengths,
    computed on the device and brought to the host in one copy. Returns the post-processors' results
    (segments_info; maps stay on the device) and those run lengths."""
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
    device = class_logits.device
    # Every segment of the batch numbered in turn (per image: panoptic, instance, semantic), and its runs of ones
    # as (segment, start, length), ordered by segment then start.
    segment_rows, semantic_labels, semantic_counts, height_of_segment, pixels_of_segment = [], [], [], [], []
    first_segment = 0
    for (height, width), result in zip(target_sizes, results):
        pixels = height * width
        before = first_segment
        if "panoptic" in result:
            ids = _panoptic_ids(result["panoptic"]["segments_info"])
            segment_rows.append(_label_map_ones(result["panoptic"]["segmentation"], ids, first_segment)[0])
            first_segment += len(ids)
        if "instance" in result:
            masks = result["instance"]["masks"]
            table = _run_table(masks) if tuple(masks.shape[1:]) == (height, width) \
                else _upsampled_run_table(masks, (height, width))
            lengths = _run_table_lengths(table, pixels)
            ones = table[:, 2] == 1
            segment_rows.append(torch.stack([table[ones, 0].to(torch.int64) + first_segment,
                                             table[ones, 1].to(torch.int64), lengths[ones]], dim=1))
            first_segment += masks.shape[0]
        if "semantic" in result:
            rows, labels = _label_map_ones(result["semantic"], None, first_segment)  # a segment per class present
            segment_rows.append(rows)
            semantic_labels.append(labels)
            semantic_counts.append(labels.numel())
            first_segment += labels.numel()
        pixels_of_segment += [pixels] * (first_segment - before)
        height_of_segment += [height] * (first_segment - before)
    rows = torch.cat(segment_rows) if segment_rows else torch.zeros((0, 3), dtype=torch.int64, device=device)
    counts, runs = _coco_counts(rows, torch.tensor(pixels_of_segment, dtype=torch.int64, device=device))
    area, box = _areas_and_boxes(rows, torch.tensor(height_of_segment, dtype=torch.int64, device=device))
    labels = torch.cat(semantic_labels) if semantic_labels else torch.zeros(0, dtype=torch.int64, device=device)
    # one copy to the host: per segment its run count, area and box, the semantic labels present, the run lengths
    parts = [runs, area, box.flatten(), labels.to(torch.int64), counts]
    host = np.split(torch.cat(parts).cpu().numpy(), np.cumsum([part.numel() for part in parts[:-1]]))
    return results, _HostCounts(runs=host[0], area=host[1], box=host[2].reshape(-1, 4), semantic_labels=host[3],
                                semantic_counts=semantic_counts, counts=host[4].astype(np.uint32))


@dataclass
class _HostCounts:
    """The host copy of a batch's segments: per segment its number of run lengths, area and COCO box (segments
    numbered per image: panoptic ids in order of first appearance, instance masks, semantic labels present), the
    semantic labels present per image in turn, and all run lengths in turn."""

    runs: np.ndarray
    area: np.ndarray
    box: np.ndarray  # (segments, 4)
    semantic_labels: np.ndarray
    semantic_counts: list[int]  # per image: how many of `semantic_labels` are its own
    counts: np.ndarray


def segments_from_counts(results: list[dict], host: _HostCounts,
                         target_sizes: list[tuple[int, int]]) -> list[ImageSegments]:
    """`segment_batch`'s host part: each image's segment rows, and its slice of the run lengths."""
    segments = []
    segment = count = label = 0  # positions in host.runs, host.counts, host.semantic_labels
    for index, ((height, width), result) in enumerate(zip(target_sizes, results)):
        image = ImageSegments(height=height, width=width)
        if "panoptic" in result:
            _add_panoptic(image, result["panoptic"]["segments_info"])
        if "instance" in result:
            for info in result["instance"]["segments_info"]:
                image.add("instance", int(info["id"]), int(info["label_id"]), float(info["score"]),
                          bool(info.get("was_fused", False)))
        if "semantic" in result:
            for label_id in host.semantic_labels[label:label + host.semantic_counts[index]]:
                image.add("semantic", int(label_id), int(label_id), None, False)  # segment_id = label_id
            label += host.semantic_counts[index]
        runs = host.runs[segment:segment + len(image.task)]
        image_counts = int(runs.sum())
        image.runs = runs.tolist()
        image.counts = host.counts[count:count + image_counts]
        image.area = host.area[segment:segment + len(image.task)]
        image.bbox = host.box[segment:segment + len(image.task)]
        segment += len(image.task)
        count += image_counts
        segments.append(image)
    return segments


def _panoptic_ids(segments_info: list[dict]) -> list[int]:
    """The panoptic segment ids in order of first appearance (a fused id appears once per fused query)."""
    return list(dict.fromkeys(int(info["id"]) for info in segments_info))


def _add_panoptic(image: ImageSegments, segments_info: list[dict]) -> None:
    # Fused stuff segments appear once per fused query under the same id: one row per id, best score.
    by_id: dict[int, dict] = {}
    for info in segments_info:
        kept = by_id.setdefault(int(info["id"]), dict(info))
        kept["score"] = max(float(kept["score"]), float(info["score"]))
        kept["was_fused"] = bool(kept.get("was_fused")) or bool(info.get("was_fused"))
    for segment_id, info in by_id.items():
        image.add("panoptic", segment_id, int(info["label_id"]), float(info["score"]),
                  bool(info.get("was_fused", False)))


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


def _run_table_lengths(table: torch.Tensor, pixels: int) -> torch.Tensor:
    """(R,) int64 length of each run of a `_run_table` (a map's last run ends with the image)."""
    starts = table[:, 1].to(torch.int64)
    ends = torch.full_like(starts, pixels)
    if len(table) > 1:
        same_map = table[1:, 0] == table[:-1, 0]
        ends[:-1] = torch.where(same_map, starts[1:], ends[:-1])
    return ends - starts


def _label_map_ones(label_map: torch.Tensor, values: list[int] | None,
                    first_segment: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The runs of `label_map == values[k]` for every k, as (segment = first_segment + k, start, length) rows
    ordered by segment then start, and `values` as a tensor; pixels of other values belong to no segment.
    `values`: unique, a few; None: every value present, ascending."""
    height, width = label_map.shape
    table = _run_table(label_map.to(torch.int32)[None])
    map_values = table[:, 2].to(torch.int64)
    values = torch.unique(map_values) if values is None \
        else torch.as_tensor(values, dtype=torch.int64, device=label_map.device)
    if values.numel() == 0:
        return torch.zeros((0, 3), dtype=torch.int64, device=label_map.device), values
    matches = map_values[:, None] == values[None, :]  # (runs, values)
    found = matches.any(dim=1)
    segment = matches.to(torch.uint8).argmax(dim=1) + first_segment
    rows = torch.stack([segment, table[:, 1].to(torch.int64), _run_table_lengths(table, height * width)],
                       dim=1)[found]
    return rows[torch.sort(rows[:, 0], stable=True).indices], values  # the map's runs come in start order


def _segment_edges(segment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows grouped by segment: whether each row is its segment's first, and whether it is its last."""
    first = torch.ones_like(segment, dtype=torch.bool)
    first[1:] = segment[1:] != segment[:-1]
    last = torch.ones_like(first)
    last[:-1] = first[1:]
    return first, last


def _coco_counts(rows: torch.Tensor, pixels_of_segment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of ones as (segment, start, length) rows ordered by segment then start -> every segment's COCO run
    lengths in turn (zeros first, possibly 0 of them; no empty last run; an empty mask is [pixels]) and how many
    each segment has. `pixels_of_segment`: (S,) the pixels of each segment's image."""
    device = pixels_of_segment.device
    segments = pixels_of_segment.numel()
    segment, start, length = rows[:, 0], rows[:, 1], rows[:, 2]
    end = start + length
    first, last = _segment_edges(segment)
    previous_end = torch.zeros_like(end)
    previous_end[1:] = end[:-1]
    gap = start - torch.where(first, 0, previous_end)  # the zeros before each run of ones
    ones_runs = torch.bincount(segment, minlength=segments)
    last_end = torch.zeros(segments, dtype=torch.int64, device=device)
    last_end[segment[last]] = end[last]
    trailing = pixels_of_segment - last_end  # zeros after the last run of ones (all of them: an empty mask)
    has_trailing = trailing > 0
    runs = 2 * ones_runs + has_trailing
    offset = torch.cumsum(runs, 0) - runs
    rank = torch.arange(len(rows), device=device) - (torch.cumsum(ones_runs, 0) - ones_runs)[segment]
    at = offset[segment] + 2 * rank
    counts = torch.empty(int(runs.sum()), dtype=torch.int64, device=device)
    counts[at] = gap
    counts[at + 1] = length
    counts[(offset + 2 * ones_runs)[has_trailing]] = trailing[has_trailing]
    return counts, runs


def _areas_and_boxes(rows: torch.Tensor, height_of_segment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_coco_counts`' rows -> each segment's area and COCO box [x, y, width, height] (int64), exactly as
    pycocotools' `area` and `toBbox` give them for its RLE: a box spans every row once a run of ones continues
    from one column into the next; an empty mask's box is zeros."""
    device = height_of_segment.device
    segments = height_of_segment.numel()
    segment, start, length = rows[:, 0], rows[:, 1], rows[:, 2]
    area = torch.zeros(segments, dtype=torch.int64, device=device).index_add_(0, segment, length)
    height = height_of_segment[segment]
    last = start + length - 1
    first_column = torch.div(start, height, rounding_mode="floor")
    last_column = torch.div(last, height, rounding_mode="floor")
    spans = (first_column != last_column).to(torch.int64)
    top = torch.full((segments,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    top.scatter_reduce_(0, segment, start - first_column * height, "amin")
    bottom = torch.full((segments,), -1, dtype=torch.int64, device=device)
    bottom.scatter_reduce_(0, segment, last - last_column * height, "amax")
    spanning = torch.zeros(segments, dtype=torch.int64, device=device).scatter_reduce_(0, segment, spans, "amax")
    top = torch.where(spanning > 0, 0, top)
    bottom = torch.where(spanning > 0, height_of_segment - 1, bottom)
    # rows come in start order within a segment: its first run has the leftmost column, its last the rightmost
    is_first, is_last = _segment_edges(segment)
    left = torch.zeros(segments, dtype=torch.int64, device=device)
    left[segment[is_first]] = first_column[is_first]
    right = torch.zeros(segments, dtype=torch.int64, device=device)
    right[segment[is_last]] = last_column[is_last]
    box = torch.stack([left, top, right - left + 1, bottom - top + 1], dim=1)
    return area, torch.where((area > 0)[:, None], box, 0)
