"""Mask2Former outputs -> semantic, instance and panoptic segmentations.

By default each function returns exactly what transformers 5.24's `Mask2FormerImageProcessor`
returns, quirks included (reference notes §1.9):
- mask logits are first upsampled to a fixed 384x384 (the size Hub checkpoints resize to), then to
  `target_sizes`; `intermediate_size=None` upsamples straight to the target size instead;
- instance segmentation binarises masks at logit > 0, i.e. it ignores `mask_threshold` and
  `overlap_mask_area_threshold`; `use_mask_threshold=True` binarises at sigmoid > mask_threshold;
- instance ids start at 0 and the background is -1 (a float32 map), panoptic ids start at 1 with 0
  for "no segment" (int32), or a -1 float32 map when no query passes `threshold`;
- panoptic fusing appends one segments_info entry per fused query (duplicate ids, was_fused=True);
- `return_coco_annotation` gives transformers' row-major run lengths of the merged id map (one
  list per id, -1 included), not pycocotools' column-major RLE.

They are faster because they upsample only what survives: instance keeps only the top-k
entries whose class score can still reach `threshold` (the final score is class score x mean mask
probability <= class score) and upsamples those queries' masks; panoptic upsamples only the queries
left after dropping low-score and no-object ones; segment areas come from one bincount instead of a
pass per query. Every kept tensor goes through the same torch ops as in the reference, so results
are identical, not merely close. Work stays on the logits' device.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "REFERENCE_INTERMEDIATE_SIZE",
    "SemanticSegmentationResult",
    "binary_mask_to_rle",
    "segmentation_to_rle",
    "post_process_semantic_segmentation",
    "post_process_instance_segmentation",
    "post_process_panoptic_segmentation",
]

# transformers upsamples every mask to this size before anything else ("(384, 384) for all models").
REFERENCE_INTERMEDIATE_SIZE = (384, 384)


class SemanticSegmentationResult(dict):
    """`segmentation` (H, W) and `segmentation_scores` (num_labels, H, W), as keys and attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error


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


def _row_sums(values: torch.Tensor) -> torch.Tensor:
    """Sum over dim 1 of (K, n), summed in the same order as for a many-row tensor.

    torch reduces a single output in parallel chunks but several outputs row by row; the reference
    sums many rows, so a lone row is duplicated to keep the same summation order (bitwise equal).
    """
    if values.shape[0] == 1:
        return values.expand(2, -1).sum(1)[:1]
    return values.sum(1)


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
    batch_size = class_logits.shape[0]
    sizes = _check_target_sizes(target_sizes, batch_size)
    class_probs = class_logits.softmax(dim=-1)[..., :-1]  # (B, Q, L)
    results = []
    for index in range(batch_size):
        mask_probs = _upsample(mask_logits[index:index + 1], intermediate_size).sigmoid()  # (1, Q, h, w)
        target_size = sizes[index] if sizes is not None else None
        segmentation = None
        if not return_segmentation_scores:
            segmentation = _semantic_map_from_candidate_classes(class_probs[index], mask_probs, target_size)
        if segmentation is None:
            scores = torch.einsum("bqc, bqhw -> bchw", class_probs[index:index + 1], mask_probs)  # (1, L, h, w)
            if target_size is not None:
                scores = F.interpolate(scores, size=target_size, mode="bilinear", align_corners=False)
            segmentation = scores[0].argmax(dim=0)
        if return_segmentation_scores:
            results.append(SemanticSegmentationResult(segmentation=segmentation, segmentation_scores=scores[0]))
        else:
            results.append(segmentation)
    return results


# Below this many classes torch may switch matrix-product kernels, and the per-class scores would no
# longer be bitwise the columns of the full product; candidate sets are padded up to it.
_MIN_CANDIDATE_CLASSES = 8
# Slack on the class upper bounds for float rounding (products, sums and interpolation weights).
_BOUND_RELATIVE_SLACK, _BOUND_ABSOLUTE_SLACK = 1e-4, 1e-6


def _semantic_map_from_candidate_classes(class_probs: torch.Tensor, mask_probs: torch.Tensor,
                                         target_size: tuple[int, int] | None) -> torch.Tensor | None:
    """The reference's argmax map, scoring only classes that can win anywhere; None when all can.

    Class c scores sum_q p(c|q) * mask_prob_q(pixel) <= sum_q p(c|q) * max mask_prob_q =: bound_c, and
    bilinear resizing (a convex combination) keeps that bound. Score a few likely classes exactly;
    any class whose bound is below the smallest per-pixel best score can neither win nor tie, so it
    is skipped. Classes that might still win are added and scored, then the argmax is taken over the
    scored classes (ascending ids, so ties resolve to the lowest id as in the full argmax).
    """
    num_classes = class_probs.shape[1]
    max_mask_probs = mask_probs[0].flatten(1).amax(dim=1)  # (Q,)
    bounds = (class_probs * max_mask_probs[:, None]).sum(0) * (1 + _BOUND_RELATIVE_SLACK) + _BOUND_ABSOLUTE_SLACK
    likely = torch.cat([class_probs.argmax(dim=1), bounds.topk(min(_MIN_CANDIDATE_CLASSES, num_classes)).indices])
    candidates = torch.unique(likely)
    for _ in range(2):
        if candidates.numel() * 2 > num_classes:
            return None  # pruning would not pay off
        scores = torch.einsum("bqc, bqhw -> bchw", class_probs[:, candidates][None], mask_probs)  # (1, K, h, w)
        if target_size is not None:
            scores = F.interpolate(scores, size=target_size, mode="bilinear", align_corners=False)
        best_scores, best = scores[0].max(dim=0)  # (H, W) each
        others = torch.ones(num_classes, dtype=torch.bool, device=bounds.device)
        others[candidates] = False
        contenders = torch.nonzero(others & (bounds >= best_scores.min())).flatten()
        if contenders.numel() == 0:
            return candidates[best]
        candidates = torch.cat([candidates, contenders]).sort().values
    return None


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
    batch_size = class_logits.shape[0]
    sizes = _check_target_sizes(target_sizes, batch_size)
    results = []
    for index in range(batch_size):
        output_size = sizes[index] if sizes is not None else (
            intermediate_size if intermediate_size is not None else tuple(mask_logits.shape[-2:]))
        masks, labels, scores = _select_instances(
            class_logits[index], mask_logits[index], threshold=threshold, intermediate_size=intermediate_size,
            target_size=sizes[index] if sizes is not None else None,
            mask_threshold=mask_threshold if use_mask_threshold else None)
        if masks is None:
            masks = torch.zeros((0, *output_size), dtype=torch.float32, device=mask_logits.device)
        segments = [{"id": segment_id, "label_id": label, "was_fused": False, "score": round(score, 6)}
                    for segment_id, (label, score) in enumerate(zip(labels, scores))]
        if return_binary_maps and segments:
            segmentation: Any = masks
        else:
            segmentation = _last_writer_id_map(masks)
            if return_coco_annotation:
                segmentation = segmentation_to_rle(segmentation)
        results.append({"segmentation": segmentation, "segments_info": segments})
    return results


def _select_instances(class_logits: torch.Tensor, mask_logits: torch.Tensor, *, threshold: float,
                      intermediate_size: tuple[int, int] | None, target_size: tuple[int, int] | None,
                      mask_threshold: float | None) -> tuple[torch.Tensor | None, list[int], list[float]]:
    """One image's kept instances in the reference's order: (K, H, W) float masks, labels, scores."""
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
    logits = _upsample_rows(mask_logits[queries], intermediate_size)  # (U, h, w)
    probs = logits.sigmoid()
    binary = (probs > mask_threshold if mask_threshold is not None else logits > 0).float()
    mean_mask_probs = (_row_sums(probs.flatten(1) * binary.flatten(1))
                       / (_row_sums(binary.flatten(1)) + 1e-6))  # (U,)
    candidate_scores = top_scores[candidates] * mean_mask_probs[row_of_candidate]
    # The reference compares Python floats: compare in float64 so a float32 threshold rounding can't differ.
    passing = torch.nonzero(candidate_scores.double() >= threshold).flatten()
    if passing.numel() == 0:
        return None, [], []
    masks = binary[row_of_candidate[passing]]  # (K, h, w) in top-k order
    if target_size is not None:
        masks = F.interpolate(masks.unsqueeze(0), size=target_size, mode="nearest")[0]
    non_empty = masks.flatten(1).any(dim=1)
    kept = passing[non_empty]
    return (masks[non_empty], top_labels[candidates[kept]].tolist(), candidate_scores[kept].tolist())


def _last_writer_id_map(masks: torch.Tensor) -> torch.Tensor:
    """(H, W) float32 map: for each pixel the index of the LAST mask covering it, else -1."""
    if masks.shape[0] == 0:
        return torch.zeros(masks.shape[1:], dtype=torch.float32, device=masks.device) - 1
    order = torch.arange(1, masks.shape[0] + 1, dtype=torch.int32, device=masks.device).view(-1, 1, 1)
    last = ((masks > 0).to(torch.int32) * order).amax(dim=0)  # (H, W), 0 = no mask
    return last.to(torch.float32) - 1


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
) -> list[dict]:
    """Per image {"segmentation", "segments_info"}, as transformers' panoptic post-processor.

    Keeps queries whose top class (no-object included) is a real class with probability >
    `threshold`; each pixel goes to the query with the highest score-weighted mask probability; a
    query becomes a segment if it owns pixels and owns more than `overlap_mask_area_threshold` of
    the pixels where its weighted probability >= `mask_threshold`. Ids start at 1 (0 = none, int32
    map); classes in `label_ids_to_fuse` share one id per class (one segments_info entry per fused
    query, was_fused=True). No query left: a float32 map of -1 and no segments.
    """
    if label_ids_to_fuse is None:
        logger.warning("`label_ids_to_fuse` unset. No instance will be fused.")
        label_ids_to_fuse = set()
    class_logits, mask_logits = _logits(outputs)
    batch_size, num_labels = class_logits.shape[0], class_logits.shape[-1] - 1
    sizes = _check_target_sizes(target_sizes, batch_size)
    top_probs, top_labels = class_logits.softmax(dim=-1).max(-1)  # (B, Q) each
    results = []
    for index in range(batch_size):
        keep = top_labels[index].ne(num_labels) & (top_probs[index] > threshold)
        if not bool(keep.any()):
            height, width = sizes[index] if sizes is not None else (
                intermediate_size if intermediate_size is not None else tuple(mask_logits.shape[-2:]))
            results.append({"segmentation": torch.zeros((height, width)) - 1, "segments_info": []})
            continue
        mask_probs = _upsample_rows(mask_logits[index][keep], intermediate_size).sigmoid()  # (K, h, w)
        scores, labels = top_probs[index][keep], top_labels[index][keep]
        segmentation, segments = _compute_segments(
            mask_probs, scores, labels, mask_threshold, overlap_mask_area_threshold, label_ids_to_fuse,
            sizes[index] if sizes is not None else None)
        results.append({"segmentation": segmentation, "segments_info": segments})
    return results


def _compute_segments(mask_probs: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, mask_threshold: float,
                      overlap_mask_area_threshold: float, label_ids_to_fuse: set[int],
                      target_size: tuple[int, int] | None) -> tuple[torch.Tensor, list[dict]]:
    """Pixel ownership by weighted argmax, then the reference's per-query keep/fuse rules on counts."""
    if target_size is not None:
        mask_probs = F.interpolate(mask_probs.unsqueeze(0), size=target_size, mode="bilinear",
                                   align_corners=False)[0]
    num_kept = mask_probs.shape[0]
    mask_probs = mask_probs * scores.view(-1, 1, 1)
    owner = mask_probs.argmax(0)  # (H, W) index of the owning query
    owned_area = torch.bincount(owner.flatten(), minlength=num_kept)  # (K,)
    original_area = (mask_probs >= mask_threshold).flatten(1).sum(1)  # (K,)
    area_ratio = owned_area / original_area  # float32, as the reference divides two int64 counts
    owned_list, original_list, ratio_list = owned_area.tolist(), original_area.tolist(), area_ratio.tolist()
    label_list, score_list = labels.tolist(), scores.tolist()
    segment_of_query = [0] * num_kept
    segments: list[dict] = []
    fused_segment_of_label: dict[int, int] = {}
    current_segment_id = 0
    for k in range(num_kept):
        label = label_list[k]
        should_fuse = label in label_ids_to_fuse
        if not (owned_list[k] > 0 and original_list[k] > 0 and ratio_list[k] > overlap_mask_area_threshold):
            continue
        if label in fused_segment_of_label:
            current_segment_id = fused_segment_of_label[label]
        else:
            current_segment_id += 1
        segment_of_query[k] = current_segment_id
        segments.append({"id": current_segment_id, "label_id": label, "was_fused": should_fuse,
                         "score": round(score_list[k], 6)})
        if should_fuse:
            fused_segment_of_label[label] = current_segment_id
    lookup = torch.tensor(segment_of_query, dtype=torch.int32, device=owner.device)
    return lookup[owner], segments
