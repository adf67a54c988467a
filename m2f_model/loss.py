"""Mask2Former training objective: Hungarian matching and point-sampled mask losses.

Follows transformers 5.24's `Mask2FormerHungarianMatcher` / `Mask2FormerLoss` (themselves after the original
detectron2 criterion) closely enough that, with the same RNG seed, the same points are drawn and the same losses
come out. Random draws (`torch.rand`) therefore happen in the same order and with the same shapes as there:
per image in the matcher, then per loss call for the uncertainty sampling, final prediction first, then each
auxiliary prediction in order.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

if TYPE_CHECKING:
    from m2f_model.configuration import Mask2FormerConfig

__all__ = [
    "Mask2FormerHungarianMatcher",
    "Mask2FormerLoss",
    "sample_points",
    "sigmoid_bce_point_loss",
    "dice_point_loss",
    "pairwise_sigmoid_bce_cost",
    "pairwise_dice_cost",
    "sample_uncertain_points",
]

MatchedIndices = list[tuple[Tensor, Tensor]]


def sample_points(features: Tensor, coordinates: Tensor) -> Tensor:
    """Bilinearly reads `features` (N, C, H, W) at `coordinates` (N, P, 2) given as (x, y) in [0, 1].

    Returns (N, C, P). Coordinates address the map with align_corners=False, so a mask and its prediction at a
    different resolution are read at the same relative places.
    """
    grid = (2.0 * coordinates - 1.0).to(features.dtype).unsqueeze(2)  # (N, P, 1, 2)
    return F.grid_sample(features, grid, align_corners=False).squeeze(3)


def sigmoid_bce_point_loss(point_logits: Tensor, point_labels: Tensor, num_masks: Tensor) -> Tensor:
    """Binary cross-entropy per mask (mean over its points), summed over masks, divided by `num_masks`."""
    per_point = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none")  # (M, P)
    return per_point.mean(1).sum() / num_masks


def dice_point_loss(point_logits: Tensor, point_labels: Tensor, num_masks: Tensor) -> Tensor:
    """Soft dice loss 1 - (2|p.t| + 1) / (|p| + |t| + 1) per mask, summed over masks, divided by `num_masks`."""
    probabilities = point_logits.sigmoid().flatten(1)  # (M, P)
    overlap = 2 * (probabilities * point_labels).sum(-1)
    total = probabilities.sum(-1) + point_labels.sum(-1)
    return (1 - (overlap + 1) / (total + 1)).sum() / num_masks


def pairwise_sigmoid_bce_cost(point_logits: Tensor, point_labels: Tensor) -> Tensor:
    """Mean binary cross-entropy of every prediction (Q, P) against every target (T, P) -> (Q, T)."""
    num_points = point_logits.shape[1]
    # BCE against label 1 is softplus(-x), against label 0 softplus(x); mixing them by the labels is a matmul.
    cost_if_positive = F.softplus(-point_logits) / num_points
    cost_if_negative = F.softplus(point_logits) / num_points
    return cost_if_positive @ point_labels.T + cost_if_negative @ (1 - point_labels).T


def pairwise_dice_cost(point_logits: Tensor, point_labels: Tensor) -> Tensor:
    """Soft dice loss of every prediction (Q, P) against every target (T, P) -> (Q, T)."""
    probabilities = point_logits.sigmoid()
    overlap = 2 * probabilities @ point_labels.T
    total = probabilities.sum(-1)[:, None] + point_labels.sum(-1)[None, :]
    return 1 - (overlap + 1) / (total + 1)


class Mask2FormerHungarianMatcher(nn.Module):
    """One-to-one assignment of predicted queries to target segments, per image.

    The cost of pairing a query with a target is
    `cost_class * (-p(target class)) + cost_mask * BCE + cost_dice * dice`, the mask terms measured on
    `num_points` random points shared by all masks of the image. Queries left unassigned are "no object".
    """

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0,
                 num_points: int = 12544) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("Mask2FormerHungarianMatcher needs at least one non-zero cost weight; all three are 0.")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(self, masks_queries_logits: Tensor, class_queries_logits: Tensor, mask_labels: list[Tensor],
                class_labels: list[Tensor]) -> MatchedIndices:
        """Matches queries to targets.

        Args:
            masks_queries_logits: (B, Q, h, w) mask logits.
            class_queries_logits: (B, Q, L + 1) class logits, the last class being "no object".
            mask_labels: per image, (T_i, H_i, W_i) binary target masks.
            class_labels: per image, (T_i,) target class ids.

        Returns:
            Per image, (query_indices, target_indices), both int64 of length min(Q, T_i).
        """
        # Costs in float32 even under mixed precision: half-precision costs blur the assignment.
        with torch.autocast(device_type=masks_queries_logits.device.type, enabled=False):
            return [self._match_image(masks_queries_logits[index].float(), class_queries_logits[index].float(),
                                      mask_labels[index], class_labels[index])
                    for index in range(masks_queries_logits.shape[0])]

    def _match_image(self, mask_logits: Tensor, class_logits: Tensor, targets: Tensor, labels: Tensor
                     ) -> tuple[Tensor, Tensor]:
        """(Q, h, w) and (Q, L + 1) logits against (T, H, W) masks and (T,) labels of one image."""
        targets = targets.to(mask_logits)

        # Drawn for every image, even one without targets, so later draws stay in step with the reference.
        coordinates = torch.rand(1, self.num_points, 2, device=mask_logits.device)  # (1, P, 2)
        if targets.shape[0] == 0:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)

        # Masks of one image share the points, so they are read as channels of a single map.
        point_logits = sample_points(mask_logits[None], coordinates)[0]  # (Q, P)
        point_labels = sample_points(targets[None], coordinates)[0]  # (T, P)

        class_cost = -class_logits.softmax(-1)[:, labels]  # (Q, T)
        cost = (self.cost_mask * pairwise_sigmoid_bce_cost(point_logits, point_labels)
                + self.cost_class * class_cost
                + self.cost_dice * pairwise_dice_cost(point_logits, point_labels))
        # Non-finite costs (diverged logits, broken targets) become the largest cost instead of failing scipy.
        largest = torch.finfo(cost.dtype).max
        cost = torch.nan_to_num(cost, nan=largest, posinf=largest, neginf=largest)
        query_indices, target_indices = linear_sum_assignment(cost.cpu().numpy())
        return (torch.as_tensor(query_indices, dtype=torch.int64),
                torch.as_tensor(target_indices, dtype=torch.int64))


def _mask_uncertainty(logits: Tensor) -> Tensor:
    """Logits near 0 are the least certain: uncertainty = -|logit|."""
    return -logits.abs()


def sample_uncertain_points(mask_logits: Tensor, *, num_points: int, oversample_ratio: float,
                            importance_sample_ratio: float,
                            uncertainty: Callable[[Tensor], Tensor] = _mask_uncertainty) -> Tensor:
    """PointRend-style point selection for each mask of `mask_logits` (M, 1, h, w) -> coordinates (M, num_points, 2).

    Draws num_points * oversample_ratio uniform candidates, keeps the importance_sample_ratio * num_points most
    uncertain ones, and fills the rest with fresh uniform points.
    """
    num_masks = mask_logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    candidates = torch.rand(num_masks, num_candidates, 2, device=mask_logits.device)  # (M, K, 2)
    candidate_uncertainty = uncertainty(sample_points(mask_logits, candidates))[:, 0, :]  # (M, K)

    num_uncertain = int(importance_sample_ratio * num_points)
    num_uniform = num_points - num_uncertain
    most_uncertain = torch.topk(candidate_uncertainty, k=num_uncertain, dim=1).indices  # (M, num_uncertain)
    mask_rows = torch.arange(num_masks, device=mask_logits.device)[:, None]
    coordinates = candidates[mask_rows, most_uncertain]  # (M, num_uncertain, 2)
    if num_uniform > 0:
        uniform = torch.rand(num_masks, num_uniform, 2, device=mask_logits.device)
        coordinates = torch.cat([coordinates, uniform], dim=1)
    return coordinates


class Mask2FormerLoss(nn.Module):
    """Set-prediction loss of Mask2Former: class cross-entropy plus point-sampled mask BCE and dice.

    The returned losses are unweighted, like transformers'; `weight_dict` (kept as an attribute) holds the weights
    the model applies. The buffer `empty_weight` (L + 1,) is part of checkpoints as
    `criterion.empty_weight`.
    """

    def __init__(self, config: Mask2FormerConfig, weight_dict: dict[str, float]) -> None:
        super().__init__()
        self.num_labels: int = config.num_labels
        self.weight_dict = weight_dict
        self.no_object_weight: float = config.no_object_weight
        self.register_buffer("empty_weight", self._class_weights())

        self.num_points: int = config.train_num_points
        self.oversample_ratio: float = config.oversample_ratio
        self.importance_sample_ratio: float = config.importance_sample_ratio
        self.matcher = Mask2FormerHungarianMatcher(cost_class=config.class_weight, cost_mask=config.mask_weight,
                                                   cost_dice=config.dice_weight, num_points=self.num_points)

    def _class_weights(self) -> Tensor:
        """(L + 1,): 1 for every class, no_object_weight for "no object"."""
        class_weights = torch.ones(self.num_labels + 1)
        class_weights[-1] = self.no_object_weight
        return class_weights

    def init_buffers(self) -> None:
        """Refills `empty_weight` from the configuration, e.g. after `to_empty()` left it uninitialised."""
        with torch.no_grad():
            self.empty_weight.copy_(self._class_weights())

    def forward(self, masks_queries_logits: Tensor, class_queries_logits: Tensor, mask_labels: list[Tensor],
                class_labels: list[Tensor],
                auxiliary_predictions: list[dict[str, Tensor]] | None = None) -> dict[str, Tensor]:
        """Losses of the final prediction and of every auxiliary (intermediate decoder layer) prediction.

        Args:
            masks_queries_logits: (B, Q, h, w) mask logits.
            class_queries_logits: (B, Q, L + 1) class logits.
            mask_labels: per image, (T_i, H, W) binary masks (any resolution; read at relative coordinates).
            class_labels: per image, (T_i,) int64 class ids in [0, L).
            auxiliary_predictions: per intermediate layer, a dict with the same two logits tensors.

        Returns:
            loss_mask, loss_dice, loss_cross_entropy, then the same keys suffixed `_{i}` for auxiliary prediction i.
        """
        self._check_targets(masks_queries_logits, mask_labels, class_labels)
        # On the logits' device: with NCCL, the all-reduce needs a GPU tensor even when the labels stay on the CPU.
        num_masks = self.average_num_masks(class_labels, device=masks_queries_logits.device)
        losses = self._prediction_losses(masks_queries_logits, class_queries_logits, mask_labels, class_labels,
                                         num_masks)
        for layer_index, auxiliary in enumerate(auxiliary_predictions or []):
            auxiliary_losses = self._prediction_losses(auxiliary["masks_queries_logits"],
                                                       auxiliary["class_queries_logits"], mask_labels, class_labels,
                                                       num_masks)
            losses.update({f"{name}_{layer_index}": value for name, value in auxiliary_losses.items()})
        return losses

    def average_num_masks(self, class_labels: list[Tensor], device: torch.device) -> Tensor:
        """Target masks per data-parallel worker (averaged over workers when torch.distributed runs), at least 1."""
        num_masks = torch.as_tensor(float(sum(len(labels) for labels in class_labels)), device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_masks)
            world_size = dist.get_world_size()
        return torch.clamp(num_masks / world_size, min=1)

    def _prediction_losses(self, masks_queries_logits: Tensor, class_queries_logits: Tensor,
                           mask_labels: list[Tensor], class_labels: list[Tensor], num_masks: Tensor
                           ) -> dict[str, Tensor]:
        matched = self.matcher(masks_queries_logits, class_queries_logits, mask_labels, class_labels)
        return {
            **self._mask_losses(masks_queries_logits, mask_labels, matched, num_masks),
            "loss_cross_entropy": self._class_loss(class_queries_logits, class_labels, matched),
        }

    def _class_loss(self, class_queries_logits: Tensor, class_labels: list[Tensor], matched: MatchedIndices
                    ) -> Tensor:
        batch_size, num_queries, _ = class_queries_logits.shape
        target_classes = torch.full((batch_size, num_queries), self.num_labels, dtype=torch.int64,
                                    device=class_queries_logits.device)  # (B, Q), "no object" unless matched
        for image_index, (query_indices, target_indices) in enumerate(matched):
            target_classes[image_index, query_indices.to(target_classes.device)] = (
                class_labels[image_index][target_indices].to(target_classes.device))
        return F.cross_entropy(class_queries_logits.transpose(1, 2), target_classes,
                               weight=self.empty_weight.to(class_queries_logits.dtype))

    def _mask_losses(self, masks_queries_logits: Tensor, mask_labels: list[Tensor], matched: MatchedIndices,
                     num_masks: Tensor) -> dict[str, Tensor]:
        image_indices = torch.cat([torch.full_like(query_indices, image_index)
                                   for image_index, (query_indices, _) in enumerate(matched)])
        query_indices = torch.cat([query_indices for query_indices, _ in matched])
        matched_logits = masks_queries_logits[image_indices, query_indices][:, None]  # (M, 1, h, w)
        matched_targets = self._matched_targets(mask_labels, matched, like=masks_queries_logits)  # (M, 1, H, W)

        with torch.no_grad():
            coordinates = sample_uncertain_points(matched_logits, num_points=self.num_points,
                                                  oversample_ratio=self.oversample_ratio,
                                                  importance_sample_ratio=self.importance_sample_ratio)
            point_labels = sample_points(matched_targets, coordinates)[:, 0]  # (M, P)
        point_logits = sample_points(matched_logits, coordinates)[:, 0]  # (M, P)
        return {
            "loss_mask": sigmoid_bce_point_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_point_loss(point_logits, point_labels, num_masks),
        }

    @staticmethod
    def _matched_targets(mask_labels: list[Tensor], matched: MatchedIndices, *, like: Tensor) -> Tensor:
        """Matched target masks, zero-padded at the bottom/right to the largest target size in the batch.

        Padding before reading at relative coordinates is what the reference does, so images of different sizes
        give the same points as there.
        """
        height = max(masks.shape[-2] for masks in mask_labels)
        width = max(masks.shape[-1] for masks in mask_labels)
        padded = []
        for masks, (_, target_indices) in zip(mask_labels, matched):
            chosen = masks[target_indices.to(masks.device)].to(like)  # (T_matched, H_i, W_i)
            padded.append(F.pad(chosen, (0, width - chosen.shape[-1], 0, height - chosen.shape[-2])))
        return torch.cat(padded)[:, None]

    def _check_targets(self, masks_queries_logits: Tensor, mask_labels: list[Tensor],
                       class_labels: list[Tensor]) -> None:
        batch_size = masks_queries_logits.shape[0]
        if len(mask_labels) != batch_size or len(class_labels) != batch_size:
            raise ValueError(f"Mask2FormerLoss got {batch_size} predictions but {len(mask_labels)} mask_labels and "
                             f"{len(class_labels)} class_labels entries; pass one (possibly empty) entry per image.")
        for image_index, (masks, labels) in enumerate(zip(mask_labels, class_labels)):
            if masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
                raise ValueError(f"Image {image_index}: mask_labels has shape {tuple(masks.shape)} and class_labels "
                                 f"{tuple(labels.shape)}; expected (N, H, W) masks and (N,) labels with the same N.")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_labels):
                raise ValueError(f"Image {image_index}: class_labels {labels.tolist()} fall outside [0, "
                                 f"{self.num_labels}); labels must be contiguous ids of the config's "
                                 f"{self.num_labels} classes.")
