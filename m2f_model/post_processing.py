"""Mask2Former outputs -> semantic, instance and panoptic segmentations.

By default each function returns exactly what transformers 5.24's `Mask2FormerImageProcessor`
returns, quirks included (reference notes §1.9):
- mask logits are first upsampled to a fixed 384x384 (the size Hub checkpoints resize to), then to
  `target_sizes`; `intermediate_size=None` upsamples straight to the target size instead;
- instance segmentation binarises masks at logit > 0, i.e. it ignores `mask_threshold` and
  `overlap_mask_area_threshold`; `use_mask_threshold=True` binarises at sigmoid > mask_threshold;
- instance ids start at 0 and the background is -1 (a float32 map), panoptic ids start at 1 with 0
  for "no segment" (int32), or a -1 float32 map when no query passes `threshold`;
- panoptic fusing appends one segments_info entry per fused query (duplicate ids, was_fused=True),
  and the segment after a reused fused id counts on from that id, so it can take an id already
  given to another segment (two labels, one id);
- `return_coco_annotation` gives transformers' row-major run lengths of the merged id map (one
  list per id, -1 included), not pycocotools' column-major RLE.

They are faster because they resize only what can matter: instance keeps only the top-k entries
whose class score can still reach `threshold` (the final score is class score x mean mask
probability <= class score) and upsamples those queries' masks; panoptic upsamples only the queries
left after dropping low-score and no-object ones, and gets segment areas from one bincount instead
of a pass per query; semantic resizes to the target size only the classes whose maximum score can
reach the per-pixel best (resizing is a convex combination, so the others can neither win nor tie).
Every value that reaches the output goes through the same torch ops, in the same batch shapes, as
in the reference, so results are identical, not merely close. Work stays on the logits' device,
and every tensor is created there (the functions run unchanged on CPU and CUDA).

`post_process_tasks` gives several tasks from one upsampling: all three functions read the same
working-size mask logits and probabilities (`_WorkingMasks`), so computing tasks together gives
exactly what each function gives alone.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .outputs import BatchFeature as SemanticSegmentationResult

logger = logging.getLogger(__name__)

__all__ = [
    "REFERENCE_INTERMEDIATE_SIZE",
    "SemanticSegmentationResult",
    "binary_mask_to_rle",
    "segmentation_to_rle",
    "post_process_semantic_segmentation",
    "post_process_instance_segmentation",
    "post_process_panoptic_segmentation",
    "post_process_tasks",
    "nearest_source_indices",
]

# transformers upsamples every mask to this size before anything else ("(384, 384) for all models").
REFERENCE_INTERMEDIATE_SIZE = (384, 384)


def _logits(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        class_logits, mask_logits = outputs.class_queries_logits, outputs.masks_queries_logits
    except AttributeError as error:
        raise TypeError(f"outputs ({type(outputs).__name__}) needs class_queries_logits and masks_queries_logits; "
                        f"pass the model's output object") from error
    if class_logits.ndim != 3 or mask_logits.ndim != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(f"class_queries_logits {tuple(class_logits.shape)} must be (batch, queries, labels + 1) "
                         f"and masks_queries_logits {tuple(mask_logits.shape)} (batch, queries, height, width)")
    return class_logits.detach(), mask_logits.detach()


def _check_target_sizes(target_sizes: Sequence | None, batch_size: int) -> list[tuple[int, int]] | None:
    if target_sizes is None:
        return None
    if len(target_sizes) != batch_size:
        raise ValueError("Make sure that you pass in as many target sizes as the batch dimension of the logits "
                         f"(got {len(target_sizes)} target sizes for a batch of {batch_size})")
    return [tuple(int(v) for v in (size.tolist() if isinstance(size, torch.Tensor) else size))
            for size in target_sizes]


def _upsample(mask_logits: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of (N, Q, h, w) logits; None keeps them as they are."""
    if size is None:
        return mask_logits
    return F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)


def _upsample_rows(mask_logits: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """`_upsample` of (K, h, w) masks; each mask's result is the same as in a full-batch call."""
    return _upsample(mask_logits.unsqueeze(0), size)[0]


def _row_sums(values: torch.Tensor, reference_rows: int) -> torch.Tensor:
    """Sum over dim 1 of (K, n), rounded as in the reference's sum over `reference_rows` rows.

    How torch splits a reduction (and so its rounding) depends on the number of rows: on CPU a single
    row is summed in parallel chunks but several rows row by row; CUDA picks its block layout from the
    shape. Zero rows pad the input to the reference's shape so every row is summed the same way.
    """
    rows = values.shape[0]
    if rows < reference_rows:
        values = torch.cat([values, values.new_zeros((reference_rows - rows, values.shape[1]))])
    return values.sum(1)[:rows]


class _WorkingMasks:
    """A batch's mask logits at the working size and their sigmoid, made once and shared by every task.

    With an intermediate size (transformers' 384x384), or with neither that nor target sizes, the whole
    batch is resized in one call and its sigmoid taken in one call, as the reference does (`uniform`);
    with target sizes and no intermediate size, each image's queries go straight to its target size.
    """

    def __init__(self, mask_logits: torch.Tensor, intermediate_size: tuple[int, int] | None,
                 sizes: list[tuple[int, int]] | None) -> None:
        self._mask_logits = mask_logits  # (B, Q, h, w)
        self._intermediate_size = intermediate_size
        self._sizes = sizes
        self.uniform = intermediate_size is not None or sizes is None
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._per_image: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def size(self, index: int) -> tuple[int, int]:
        if self._intermediate_size is not None:
            return tuple(self._intermediate_size)
        if self._sizes is not None:
            return self._sizes[index]
        return tuple(self._mask_logits.shape[-2:])

    def batch_probs(self) -> torch.Tensor:
        """(B, Q, h, w) probabilities; only when `uniform` (one working size for the batch)."""
        return self._whole_batch()[1]

    def logits(self, index: int) -> torch.Tensor:
        return self._image(index)[0]  # (Q, h, w)

    def probs(self, index: int) -> torch.Tensor:
        return self._image(index)[1]  # (Q, h, w)

    def _whole_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batch is None:
            logits = _upsample(self._mask_logits, self._intermediate_size)
            self._batch = (logits, logits.sigmoid())
        return self._batch

    def _image(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.uniform:
            logits, probs = self._whole_batch()
            return logits[index], probs[index]
        if index not in self._per_image:
            logits = _upsample_rows(self._mask_logits[index], self._sizes[index])
            self._per_image[index] = (logits, logits.sigmoid())
        return self._per_image[index]


# --------------------------------------------------------------------------------------- RLE
def _run_lengths(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal values in a 1-D array: (values, 0-based starts, lengths)."""
    if flat.size == 0:
        return flat, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    lengths = np.diff(np.concatenate((starts, [flat.size])))
    return flat[starts], starts, lengths


def binary_mask_to_rle(mask: torch.Tensor | np.ndarray) -> list[int]:
    """transformers' run-length encoding of a (H, W) binary mask.

    Row-major: [start_1, length_1, start_2, length_2, ...] where start is the 1-based index of
    the first pixel of each run of ones. Not pycocotools' column-major counts.
    """
    flat = (mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)).reshape(-1)
    values, starts, lengths = _run_lengths(flat != 0)
    ones = values.astype(bool)
    return np.stack([starts[ones] + 1, lengths[ones]], axis=1).reshape(-1).tolist()


def segmentation_to_rle(segmentation: torch.Tensor) -> list[list[int]]:
    """`binary_mask_to_rle` of `segmentation == id` for every id present, ids ascending (-1 included)."""
    flat = segmentation.detach().cpu().numpy().reshape(-1)
    values, starts, lengths = _run_lengths(flat)
    encodings = []
    for segment_id in np.unique(flat):
        runs = values == segment_id
        encodings.append(np.stack([starts[runs] + 1, lengths[runs]], axis=1).reshape(-1).tolist())
    return encodings


# ---------------------------------------------------------------------------------- semantic
def post_process_semantic_segmentation(
    outputs: Any,
    target_sizes: Sequence[tuple[int, int]] | None = None,
    return_segmentation_scores: bool = False,
    *,
    intermediate_size: tuple[int, int] | None = REFERENCE_INTERMEDIATE_SIZE,
) -> list:
    """Per image a (H, W) int64 map of class ids: argmax over classes of sum_q p(class|q) * sigmoid(mask_q).

    Maps are `intermediate_size` (384x384) without `target_sizes`, else each image's target size.
    `return_segmentation_scores=True` returns `SemanticSegmentationResult`s that also hold the
    (num_labels, H, W) scores. `intermediate_size=None` skips the fixed 384x384 step.
    """
    class_logits, mask_logits = _logits(outputs)
    sizes = _check_target_sizes(target_sizes, class_logits.shape[0])
    working = _WorkingMasks(mask_logits, intermediate_size, sizes)
    return _semantic_maps(class_logits, working, sizes, return_segmentation_scores)


def _semantic_maps(class_logits: torch.Tensor, working: _WorkingMasks, sizes: list[tuple[int, int]] | None,
                   return_segmentation_scores: bool) -> list:
    batch_size = class_logits.shape[0]
    class_probs = class_logits.softmax(dim=-1)[..., :-1]  # (B, Q, L)
    if not working.uniform:
        return [_semantic_map_at(class_probs[index], working.probs(index), return_segmentation_scores)
                for index in range(batch_size)]
    # One product over the whole batch, as the reference: the matrix kernel (and its rounding) depends
    # on the batch shape, and identical scores are what make identical argmax maps.
    scores = torch.einsum("bqc, bqhw -> bchw", class_probs, working.batch_probs())  # (B, L, h, w)
    results = []
    for index in range(batch_size):
        target_size = sizes[index] if sizes is not None else None
        if return_segmentation_scores:
            image_scores = scores[index]
            if target_size is not None:
                image_scores = F.interpolate(image_scores[None], size=target_size, mode="bilinear",
                                             align_corners=False)[0]
            results.append(SemanticSegmentationResult(segmentation=_argmax_over_first_dim(image_scores),
                                                      segmentation_scores=image_scores))
        else:
            results.append(_argmax_over_likely_classes(scores[index], target_size))
    return results


def _semantic_map_at(class_probs: torch.Tensor, mask_probs: torch.Tensor, return_segmentation_scores: bool) -> Any:
    """Scores from mask probabilities already at the target size (as the original Mask2Former does)."""
    scores = torch.einsum("qc, qhw -> chw", class_probs, mask_probs)  # (L, H, W)
    if return_segmentation_scores:
        return SemanticSegmentationResult(segmentation=_argmax_over_first_dim(scores), segmentation_scores=scores)
    return _argmax_over_likely_classes(scores, None)


def _max_over_first_dim(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`values.max(0)` of (C, H, W): (best values, first index of the best, as argmax gives it).

    One reduction, not a running maximum plane by plane: on CPU a loop of three small ops per plane costs
    about twice the CPU time single-threaded, and with several threads every op waits for the slowest thread
    (each a scheduler slice when the cores are shared), up to 20x; on a GPU it is a launch per plane.
    """
    return values.max(dim=0)


def _argmax_over_first_dim(values: torch.Tensor) -> torch.Tensor:
    """`values.argmax(0)` for (C, H, W)."""
    return _max_over_first_dim(values)[1]


# Slack on class upper bounds for float rounding in bilinear resizing (weights summing to 1 +- ulps).
_BOUND_RELATIVE_SLACK, _BOUND_ABSOLUTE_SLACK = 1e-5, 1e-7


def _argmax_over_likely_classes(scores: torch.Tensor, target_size: tuple[int, int] | None) -> torch.Tensor:
    """argmax over classes of `scores` (L, h, w) resized to `target_size`, resizing only classes that can win.

    Bilinear resizing is a convex combination, so a class never scores above its maximum at (h, w).
    A class whose maximum is strictly below the smallest per-pixel best of the resized classes can
    neither win nor tie anywhere, so it is never resized. Resized classes keep ascending ids, so
    ties resolve to the lowest id, as in the full argmax.
    """
    num_classes = scores.shape[0]
    class_maxima = scores.flatten(1).amax(dim=1) * (1 + _BOUND_RELATIVE_SLACK) + _BOUND_ABSOLUTE_SLACK  # (L,)
    candidates = torch.nonzero(class_maxima >= 0.25 * class_maxima.max()).flatten()
    for _ in range(2):
        if candidates.numel() * 2 > num_classes:
            break  # most classes could win: resize them all
        candidate_scores = scores[candidates]
        if target_size is not None:
            candidate_scores = F.interpolate(candidate_scores[None], size=target_size, mode="bilinear",
                                             align_corners=False)[0]
        best_scores, best = _max_over_first_dim(candidate_scores)  # (H, W) each
        others = torch.ones(num_classes, dtype=torch.bool, device=scores.device)
        others[candidates] = False
        contenders = torch.nonzero(others & (class_maxima >= best_scores.min())).flatten()
        if contenders.numel() == 0:
            return candidates[best]
        candidates = torch.cat([candidates, contenders]).sort().values
    if target_size is not None:
        scores = F.interpolate(scores[None], size=target_size, mode="bilinear", align_corners=False)[0]
    return _argmax_over_first_dim(scores)


# ---------------------------------------------------------------------------------- instance
def post_process_instance_segmentation(
    outputs: Any,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    target_sizes: Sequence[tuple[int, int]] | None = None,
    return_coco_annotation: bool | None = False,
    return_binary_maps: bool | None = False,
    *,
    intermediate_size: tuple[int, int] | None = REFERENCE_INTERMEDIATE_SIZE,
    use_mask_threshold: bool = False,
) -> list[dict]:
    """Per image {"segmentation", "segments_info"}, as transformers' instance post-processor.

    Takes the top num_queries (query, class) pairs by class probability, binarises each mask at
    logit > 0, scores it class prob x mean mask probability inside the mask, and keeps those
    scoring >= `threshold` with a non-empty mask. `segmentation` is a float32 id map (ids from 0,
    -1 background, later segments overwriting earlier ones), or with `return_coco_annotation` the
    row-major RLE of each id, or with `return_binary_maps` the (num_instances, H, W) float masks
    (the only output that keeps overlaps). `segments_info`: id, label_id, was_fused=False, score.

    `mask_threshold` and `overlap_mask_area_threshold` are ignored, as in transformers, unless
    `use_mask_threshold=True` (then masks are binarised at sigmoid > mask_threshold).
    """
    if return_coco_annotation and return_binary_maps:
        raise ValueError("return_coco_annotation and return_binary_maps can not be both set to True.")
    class_logits, mask_logits = _logits(outputs)
    sizes = _check_target_sizes(target_sizes, class_logits.shape[0])
    working = _WorkingMasks(mask_logits, intermediate_size, sizes)
    results = []
    for masks, segments in _instances(class_logits, working, sizes, threshold=threshold,
                                      mask_threshold=mask_threshold if use_mask_threshold else None):
        if return_binary_maps and segments:
            segmentation: Any = masks.to(torch.float32)
        else:
            segmentation = _last_writer_id_map(masks)
            if return_coco_annotation:
                segmentation = segmentation_to_rle(segmentation)
        results.append({"segmentation": segmentation, "segments_info": segments})
    return results


def _instances(class_logits: torch.Tensor, working: _WorkingMasks, sizes: list[tuple[int, int]] | None, *,
               threshold: float, mask_threshold: float | None,
               upsampled_masks: bool = True) -> list[tuple[torch.Tensor, list[dict]]]:
    """Per image (K, H, W) uint8 masks (K may be 0) and their segments_info, in the reference's order.

    `upsampled_masks=False` leaves masks at the working size when the target is at least as large in both
    dimensions (the reference's nearest upsampling then keeps every mask non-empty, so the kept instances are
    the same); the caller can then read the target masks through the nearest index maps."""
    results = []
    for index in range(class_logits.shape[0]):
        target_size = sizes[index] if sizes is not None else None
        if target_size is not None and not upsampled_masks and all(
                target >= working for target, working in zip(target_size, working.size(index))):
            target_size = None
        masks, labels, scores = _select_instances(class_logits[index], working.logits(index), working.probs(index),
                                                  target_size=target_size, mask_threshold=mask_threshold,
                                                  threshold=threshold)
        if masks is None:
            output_size = target_size if target_size is not None else working.size(index)
            masks = torch.zeros((0, *output_size), dtype=torch.uint8, device=class_logits.device)
        segments = [{"id": segment_id, "label_id": label, "was_fused": False, "score": round(score, 6)}
                    for segment_id, (label, score) in enumerate(zip(labels, scores))]
        results.append((masks, segments))
    return results


def _select_instances(class_logits: torch.Tensor, mask_logits: torch.Tensor, mask_probs: torch.Tensor, *,
                      threshold: float, target_size: tuple[int, int] | None,
                      mask_threshold: float | None) -> tuple[torch.Tensor | None, list[int], list[float]]:
    """One image's kept instances in the reference's order: (K, H, W) uint8 masks, labels, scores.

    mask_logits, mask_probs: (Q, h, w) at the working size.
    """
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    class_probs = class_logits.softmax(dim=-1)[:, :-1]  # (Q, L)
    # Same call as the reference: its unsorted order is the segment order.
    top_scores, top_indices = class_probs.flatten(0, 1).topk(num_queries, sorted=False)  # (Q,)
    top_labels = top_indices % num_classes
    top_queries = torch.div(top_indices, num_classes, rounding_mode="floor")
    # final score = class prob x mean mask prob <= class prob: pairs below threshold cannot survive.
    candidates = torch.nonzero(top_scores.double() >= threshold).flatten()
    if candidates.numel() == 0:
        return None, [], []
    queries, row_of_candidate = torch.unique(top_queries[candidates], return_inverse=True)
    if 2 * queries.numel() > num_queries:
        # Most queries are candidates: scoring all of them costs less than copying the candidates' masks out.
        logits, probs, row_of_candidate = mask_logits, mask_probs, top_queries[candidates]  # (Q, h, w)
    else:
        logits, probs = mask_logits[queries], mask_probs[queries]  # (U, h, w)
    inside = (probs > mask_threshold if mask_threshold is not None else logits > 0).flatten(1)  # (U, h*w)
    # where(inside, p, 0) holds the same values as the reference's p * float(inside): same sums.
    areas = inside.sum(dim=1, dtype=torch.int32).to(probs.dtype)
    inside_probs = torch.where(inside, probs.flatten(1), 0.0)
    mean_mask_probs = _row_sums(inside_probs, num_queries) / (areas + 1e-6)  # (U,)
    candidate_scores = top_scores[candidates] * mean_mask_probs[row_of_candidate]
    # The reference compares Python floats: compare in float64 so a float32 threshold rounding can't differ.
    passing = torch.nonzero(candidate_scores.double() >= threshold).flatten()
    if passing.numel() == 0:
        return None, [], []
    masks = inside.view(logits.shape)[row_of_candidate[passing]].to(torch.uint8)  # (K, h, w) in top-k order
    if target_size is not None and tuple(masks.shape[-2:]) != tuple(target_size):
        masks = F.interpolate(masks.unsqueeze(0), size=target_size, mode="nearest")[0]
    non_empty = masks.flatten(1).any(dim=1).bool()
    if not bool(non_empty.all()):  # (a mask can vanish when the target is smaller than the working size)
        masks, passing = masks[non_empty], passing[non_empty]
    return masks, top_labels[candidates[passing]].tolist(), candidate_scores[passing].tolist()


def nearest_source_indices(source_size: int, target_size: int, device: torch.device | str) -> torch.Tensor:
    """(target_size,) int64: the source index each output index reads in a "nearest" `F.interpolate` from
    `source_size` to `target_size` along one dimension (taken from the kernel itself, so it always agrees)."""
    positions = torch.arange(source_size, dtype=torch.float32, device=device).view(1, 1, source_size, 1)
    return F.interpolate(positions, size=(target_size, 1), mode="nearest").view(-1).to(torch.int64)


def _last_writer_id_map(masks: torch.Tensor) -> torch.Tensor:
    """(H, W) float32 map: for each pixel the index of the LAST mask covering it, else -1."""
    last_writer = torch.zeros(masks.shape[1:], dtype=torch.int32, device=masks.device)  # 0 = none, k + 1 = mask k
    for segment_id, mask in enumerate(masks):
        torch.maximum(last_writer, (mask > 0).to(torch.int32) * (segment_id + 1), out=last_writer)
    return last_writer.to(torch.float32) - 1


# ---------------------------------------------------------------------------------- panoptic
def post_process_panoptic_segmentation(
    outputs: Any,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse: set[int] | None = None,
    target_sizes: Sequence[tuple[int, int]] | None = None,
    *,
    intermediate_size: tuple[int, int] | None = REFERENCE_INTERMEDIATE_SIZE,
    unique_segment_ids: bool = False,
) -> list[dict]:
    """Per image {"segmentation", "segments_info"}, as transformers' panoptic post-processor.

    Keeps queries whose top class (no-object included) is a real class with probability >
    `threshold`; each pixel goes to the query with the highest score-weighted mask probability; a
    query becomes a segment if it owns pixels and owns more than `overlap_mask_area_threshold` of
    the pixels where its weighted probability >= `mask_threshold`. Ids start at 1 (0 = none, int32
    map); classes in `label_ids_to_fuse` share one id per class (one segments_info entry per fused
    query, was_fused=True). No query left: a float32 map of -1 and no segments.

    Like transformers, the segment after a reused fused id counts on from that id and can collide
    with an earlier segment's id; `unique_segment_ids=True` gives every new segment a fresh id.
    """
    if label_ids_to_fuse is None:
        logger.warning("`label_ids_to_fuse` unset. No instance will be fused.")
        label_ids_to_fuse = set()
    class_logits, mask_logits = _logits(outputs)
    sizes = _check_target_sizes(target_sizes, class_logits.shape[0])
    return _panoptic(class_logits, _WorkingMasks(mask_logits, intermediate_size, sizes), sizes,
                     threshold=threshold, mask_threshold=mask_threshold,
                     overlap_mask_area_threshold=overlap_mask_area_threshold, label_ids_to_fuse=label_ids_to_fuse,
                     unique_segment_ids=unique_segment_ids)


def _panoptic(class_logits: torch.Tensor, working: _WorkingMasks, sizes: list[tuple[int, int]] | None, *,
              threshold: float, mask_threshold: float, overlap_mask_area_threshold: float,
              label_ids_to_fuse: set[int], unique_segment_ids: bool) -> list[dict]:
    batch_size, num_labels = class_logits.shape[0], class_logits.shape[-1] - 1
    top_probs, top_labels = class_logits.softmax(dim=-1).max(-1)  # (B, Q) each
    results = []
    for index in range(batch_size):
        target_size = sizes[index] if sizes is not None else None
        keep = top_labels[index].ne(num_labels) & (top_probs[index] > threshold)
        if not bool(keep.any()):
            height, width = target_size if target_size is not None else working.size(index)
            results.append({"segmentation": torch.full((height, width), -1.0, device=class_logits.device),
                            "segments_info": []})
            continue
        resize_to = target_size if working.size(index) != target_size else None
        mask_probs = working.probs(index)
        # _compute_segments scales the probabilities in place: they must be a copy unless it resizes them first.
        if resize_to is None or not bool(keep.all()):
            mask_probs = mask_probs[keep]  # (K, h, w)
        scores, labels = top_probs[index][keep], top_labels[index][keep]
        segmentation, segments = _compute_segments(
            mask_probs, scores, labels, mask_threshold, overlap_mask_area_threshold, label_ids_to_fuse,
            resize_to, unique_segment_ids)
        results.append({"segmentation": segmentation, "segments_info": segments})
    return results


# ----------------------------------------------------------------------------- several tasks at once
TASKS = ("panoptic", "instance", "semantic")


def post_process_tasks(
    outputs: Any,
    tasks: Sequence[str] = TASKS,
    *,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse: set[int] | None = None,
    target_sizes: Sequence[tuple[int, int]] | None = None,
    intermediate_size: tuple[int, int] | None = REFERENCE_INTERMEDIATE_SIZE,
    unique_segment_ids: bool = False,
    use_mask_threshold: bool = False,
    instance_masks_at_working_size: bool = False,
) -> list[dict[str, Any]]:
    """Several tasks from one upsampling of the mask logits: per image {task: result}.

    Each result equals what that task's own function returns for the same arguments (they share the
    same code and the same working tensors): "panoptic" as `post_process_panoptic_segmentation`,
    "semantic" as `post_process_semantic_segmentation` (the map), "instance" as
    `post_process_instance_segmentation(return_binary_maps=True)` but with the masks as (K, H, W)
    uint8 under "masks" (K may be 0) beside "segments_info".

    `instance_masks_at_working_size=True`: where an image's target size is at least the working size in
    both dimensions, its instance masks stay at the working size (K, h, w); the target masks are their
    nearest-neighbour upsampling (`masks[:, rows][:, :, columns]` with `nearest_source_indices`), which a
    caller can read without materialising them.
    """
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks {list(tasks)}: choose one or more of {', '.join(TASKS)}")
    class_logits, mask_logits = _logits(outputs)
    sizes = _check_target_sizes(target_sizes, class_logits.shape[0])
    working = _WorkingMasks(mask_logits, intermediate_size, sizes)
    results: list[dict[str, Any]] = [{} for _ in range(class_logits.shape[0])]
    if "panoptic" in tasks:
        panoptic = _panoptic(class_logits, working, sizes, threshold=threshold, mask_threshold=mask_threshold,
                             overlap_mask_area_threshold=overlap_mask_area_threshold,
                             label_ids_to_fuse=set(label_ids_to_fuse or ()), unique_segment_ids=unique_segment_ids)
        for result, image_result in zip(results, panoptic):
            result["panoptic"] = image_result
    if "instance" in tasks:
        instances = _instances(class_logits, working, sizes, threshold=threshold,
                               mask_threshold=mask_threshold if use_mask_threshold else None,
                               upsampled_masks=not instance_masks_at_working_size)
        for result, (masks, segments) in zip(results, instances):
            result["instance"] = {"masks": masks, "segments_info": segments}
    if "semantic" in tasks:
        for result, label_map in zip(results, _semantic_maps(class_logits, working, sizes, False)):
            result["semantic"] = label_map
    return results


def _count_per_plane(flags: torch.Tensor) -> torch.Tensor:
    """(K, H, W) booleans -> (K,) int32 counts of True. On CPU plane by plane (each plane stays in cache:
    ~2.5x faster single-threaded than one strided reduction); elsewhere one reduction, not K launches."""
    if flags.device.type == "cpu":
        return torch.stack([torch.count_nonzero(plane) for plane in flags]).to(torch.int32)
    return flags.flatten(1).sum(dim=1, dtype=torch.int32)


def _compute_segments(mask_probs: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, mask_threshold: float,
                      overlap_mask_area_threshold: float, label_ids_to_fuse: set[int],
                      target_size: tuple[int, int] | None,
                      unique_segment_ids: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """Pixel ownership by weighted argmax, then the reference's per-query keep/fuse rules on counts."""
    if target_size is not None:
        mask_probs = F.interpolate(mask_probs.unsqueeze(0), size=target_size, mode="bilinear",
                                   align_corners=False)[0]
    num_kept = mask_probs.shape[0]
    mask_probs = mask_probs.mul_(scores.view(-1, 1, 1))
    owner = _argmax_over_first_dim(mask_probs)  # (H, W) index of the owning query
    owned_area = torch.bincount(owner.flatten(), minlength=num_kept).to(torch.int32)  # (K,)
    original_area = _count_per_plane(mask_probs >= mask_threshold)  # (K,)
    area_ratio = owned_area / original_area  # float32, as the reference divides the two counts
    owned_list, original_list, ratio_list = owned_area.tolist(), original_area.tolist(), area_ratio.tolist()
    label_list, score_list = labels.tolist(), scores.tolist()
    segment_of_query = [0] * num_kept
    segments: list[dict] = []
    fused_segment_of_label: dict[int, int] = {}
    current_segment_id = largest_segment_id = 0
    for k in range(num_kept):
        label = label_list[k]
        should_fuse = label in label_ids_to_fuse
        if not (owned_list[k] > 0 and original_list[k] > 0 and ratio_list[k] > overlap_mask_area_threshold):
            continue
        if label in fused_segment_of_label:
            current_segment_id = fused_segment_of_label[label]
        else:
            current_segment_id = (largest_segment_id if unique_segment_ids else current_segment_id) + 1
        largest_segment_id = max(largest_segment_id, current_segment_id)
        segment_of_query[k] = current_segment_id
        segments.append({"id": current_segment_id, "label_id": label, "was_fused": should_fuse,
                         "score": round(score_list[k], 6)})
        if should_fuse:
            fused_segment_of_label[label] = current_segment_id
    lookup = torch.tensor(segment_of_query, dtype=torch.int32, device=owner.device)
    return lookup[owner], segments
