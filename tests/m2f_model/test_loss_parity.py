"""Parity of m2f_model's matcher and loss with transformers' Mask2FormerHungarianMatcher / Mask2FormerLoss.

Same logits, same targets, same RNG seed -> same matching, same loss dict, same gradients.
"""
from __future__ import annotations

import pytest
import torch
from transformers import Mask2FormerConfig as ReferenceConfig
from transformers.models.mask2former import modeling_mask2former as reference

import m2f_model
from m2f_model import loss as ours

TOLERANCE = 1e-4
NUM_LABELS = 5
WEIGHT_DICT = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


LOSS_SETTINGS = ("num_labels", "no_object_weight", "class_weight", "mask_weight", "dice_weight", "train_num_points",
                 "oversample_ratio", "importance_sample_ratio")


def make_config(**overrides) -> ReferenceConfig:
    settings = {"num_labels": NUM_LABELS, "train_num_points": 96}
    settings.update(overrides)
    return ReferenceConfig(**settings)


def our_config(reference_config: ReferenceConfig) -> m2f_model.Mask2FormerConfig:
    """m2f_model's config with the same loss settings as the reference one."""
    return m2f_model.Mask2FormerConfig(**{name: getattr(reference_config, name) for name in LOSS_SETTINGS})


def make_predictions(generator: torch.Generator, batch_size: int, *, num_queries: int = 8, size: int = 12,
                     num_auxiliary: int = 2) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    def logits() -> tuple[torch.Tensor, torch.Tensor]:
        masks = 3 * torch.randn(batch_size, num_queries, size, size, generator=generator)
        classes = torch.randn(batch_size, num_queries, NUM_LABELS + 1, generator=generator)
        return masks.requires_grad_(), classes.requires_grad_()

    masks, classes = logits()
    auxiliary = []
    for _ in range(num_auxiliary):
        aux_masks, aux_classes = logits()
        auxiliary.append({"masks_queries_logits": aux_masks, "class_queries_logits": aux_classes})
    return masks, classes, auxiliary


def make_targets(generator: torch.Generator, counts: list[int], sizes: list[tuple[int, int]]
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Blob-like binary masks (random rectangles) with random classes, `counts[i]` of them in image i."""
    mask_labels, class_labels = [], []
    for count, (height, width) in zip(counts, sizes):
        masks = torch.zeros(count, height, width)
        for index in range(count):
            top, left = (int(v) for v in torch.randint(0, height // 2, (2,), generator=generator))
            extent = int(torch.randint(4, height // 2 + 1, (1,), generator=generator))
            masks[index, top:top + extent, left:left + extent] = 1
        mask_labels.append(masks)
        class_labels.append(torch.randint(0, NUM_LABELS, (count,), generator=generator))
    return mask_labels, class_labels


def detached_copies(masks, classes, auxiliary):
    def copy(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().clone().requires_grad_()

    return copy(masks), copy(classes), [{key: copy(value) for key, value in entry.items()} for entry in auxiliary]


def run_loss(loss_module, masks, classes, mask_labels, class_labels, auxiliary, *, seed: int):
    torch.manual_seed(seed)
    losses = loss_module(masks, classes, mask_labels, class_labels, auxiliary)
    total = sum(value * WEIGHT_DICT[next(k for k in WEIGHT_DICT if name.startswith(k))]
                for name, value in losses.items())
    total.backward()
    return losses


def assert_losses_and_gradients_match(config, masks, classes, auxiliary, mask_labels, class_labels, seed=7):
    reference_inputs = detached_copies(masks, classes, auxiliary)
    our_inputs = detached_copies(masks, classes, auxiliary)
    reference_losses = run_loss(reference.Mask2FormerLoss(config, WEIGHT_DICT), reference_inputs[0],
                                reference_inputs[1], mask_labels, class_labels, reference_inputs[2], seed=seed)
    our_losses = run_loss(ours.Mask2FormerLoss(our_config(config), WEIGHT_DICT), our_inputs[0], our_inputs[1],
                          mask_labels, class_labels, our_inputs[2], seed=seed)

    assert list(our_losses) == list(reference_losses)
    for name, reference_value in reference_losses.items():
        torch.testing.assert_close(our_losses[name], reference_value, atol=TOLERANCE, rtol=0, msg=name)

    reference_leaves = [reference_inputs[0], reference_inputs[1]] + [
        tensor for entry in reference_inputs[2] for tensor in entry.values()]
    our_leaves = [our_inputs[0], our_inputs[1]] + [tensor for entry in our_inputs[2] for tensor in entry.values()]
    for our_leaf, reference_leaf in zip(our_leaves, reference_leaves):
        assert reference_leaf.grad is not None and reference_leaf.grad.abs().sum() > 0
        torch.testing.assert_close(our_leaf.grad, reference_leaf.grad, atol=TOLERANCE, rtol=0)


def test_matcher_assigns_the_same_queries_to_the_same_targets_as_transformers():
    generator = torch.Generator().manual_seed(0)
    masks, classes, _ = make_predictions(generator, 4, num_auxiliary=0)
    mask_labels, class_labels = make_targets(generator, [3, 0, 1, 8], [(48, 48)] * 4)
    reference_matcher = reference.Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0,
                                                              num_points=96)
    our_matcher = ours.Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=96)

    torch.manual_seed(3)
    reference_indices = reference_matcher(masks, classes, mask_labels, class_labels)
    torch.manual_seed(3)
    our_indices = our_matcher(masks, classes, mask_labels, class_labels)

    assert [len(queries) for queries, _ in our_indices] == [3, 0, 1, 8]
    for (our_queries, our_targets), (reference_queries, reference_targets) in zip(our_indices, reference_indices):
        assert our_queries.dtype == torch.int64 and our_targets.dtype == torch.int64
        assert torch.equal(our_queries, reference_queries)
        assert torch.equal(our_targets, reference_targets)


def test_losses_and_logit_gradients_match_transformers_with_auxiliary_predictions_and_an_empty_image():
    generator = torch.Generator().manual_seed(1)
    masks, classes, auxiliary = make_predictions(generator, 3, num_auxiliary=2)
    mask_labels, class_labels = make_targets(generator, [2, 0, 5], [(48, 48)] * 3)
    assert_losses_and_gradients_match(make_config(), masks, classes, auxiliary, mask_labels, class_labels)


def test_losses_match_transformers_when_targets_have_different_sizes_per_image():
    generator = torch.Generator().manual_seed(2)
    masks, classes, auxiliary = make_predictions(generator, 2, num_auxiliary=1)
    mask_labels, class_labels = make_targets(generator, [3, 2], [(48, 40), (32, 48)])
    assert_losses_and_gradients_match(make_config(), masks, classes, auxiliary, mask_labels, class_labels)


def test_losses_match_transformers_with_non_default_weights_and_sampling_ratios():
    config = make_config(no_object_weight=0.3, class_weight=4.0, mask_weight=2.0, dice_weight=1.5,
                         train_num_points=50, oversample_ratio=2.0, importance_sample_ratio=0.5)
    generator = torch.Generator().manual_seed(4)
    masks, classes, auxiliary = make_predictions(generator, 2, num_auxiliary=1)
    mask_labels, class_labels = make_targets(generator, [4, 1], [(40, 40)] * 2)
    assert_losses_and_gradients_match(config, masks, classes, auxiliary, mask_labels, class_labels)


def test_batch_without_any_target_gives_zero_mask_losses_and_no_object_cross_entropy_like_transformers():
    generator = torch.Generator().manual_seed(5)
    masks, classes, _ = make_predictions(generator, 2, num_auxiliary=0)
    mask_labels = [torch.zeros(0, 32, 32), torch.zeros(0, 32, 32)]
    class_labels = [torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)]

    torch.manual_seed(0)
    reference_losses = reference.Mask2FormerLoss(make_config(), WEIGHT_DICT)(masks, classes, mask_labels,
                                                                             class_labels)
    torch.manual_seed(0)
    our_losses = ours.Mask2FormerLoss(our_config(make_config()), WEIGHT_DICT)(masks, classes, mask_labels,
                                                                              class_labels)

    assert our_losses["loss_mask"].item() == 0.0 and our_losses["loss_dice"].item() == 0.0
    expected_cross_entropy = torch.nn.functional.cross_entropy(
        classes.detach().flatten(0, 1), torch.full((16,), NUM_LABELS))
    torch.testing.assert_close(our_losses["loss_cross_entropy"], expected_cross_entropy)
    for name, reference_value in reference_losses.items():
        torch.testing.assert_close(our_losses[name], reference_value, atol=TOLERANCE, rtol=0)


def test_empty_weight_is_a_persistent_buffer_with_the_no_object_weight_last():
    loss_module = ours.Mask2FormerLoss(our_config(make_config(no_object_weight=0.25)), WEIGHT_DICT)
    state = loss_module.state_dict()
    assert list(state) == ["empty_weight"]
    assert state["empty_weight"].tolist() == [1.0] * NUM_LABELS + [0.25]
    holder = torch.nn.Module()
    holder.criterion = loss_module
    assert "criterion.empty_weight" in holder.state_dict()


def test_num_masks_is_averaged_over_data_parallel_workers(monkeypatch):
    """With another worker holding 7 masks, two workers normalise by (3 + 7) / 2 = 5 masks each."""
    def all_reduce_with_a_second_worker(tensor, *args, **kwargs):
        tensor += 7

    monkeypatch.setattr(ours.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ours.dist, "all_reduce", all_reduce_with_a_second_worker)
    monkeypatch.setattr(ours.dist, "get_world_size", lambda: 2)
    loss_module = ours.Mask2FormerLoss(our_config(make_config()), WEIGHT_DICT)
    class_labels = [torch.tensor([0, 1]), torch.tensor([4])]
    assert loss_module.average_num_masks(class_labels, torch.device("cpu")).item() == 5.0

    monkeypatch.setattr(ours.dist, "all_reduce", lambda tensor, *args, **kwargs: None)
    monkeypatch.setattr(ours.dist, "get_world_size", lambda: 4)
    assert loss_module.average_num_masks(class_labels, torch.device("cpu")).item() == 1.0  # 3 / 4 clamped to 1


def test_class_labels_outside_the_label_set_are_rejected_with_the_image_named():
    loss_module = ours.Mask2FormerLoss(our_config(make_config()), WEIGHT_DICT)
    generator = torch.Generator().manual_seed(6)
    masks, classes, _ = make_predictions(generator, 2, num_auxiliary=0)
    mask_labels, _ = make_targets(generator, [1, 2], [(32, 32)] * 2)
    with pytest.raises(ValueError, match=r"Image 1: class_labels \[2, 5\]"):
        loss_module(masks, classes, mask_labels, [torch.tensor([0]), torch.tensor([2, NUM_LABELS])])
    with pytest.raises(ValueError, match="Image 0: mask_labels has shape"):
        loss_module(masks, classes, mask_labels, [torch.tensor([0, 1]), torch.tensor([2, 3])])


def test_model_forward_with_labels_gives_the_loss_and_parameter_gradients_of_transformers(
        model_config_kwargs, model_reference_checkpoint, model_padded_batch, tmp_path):
    """Both models from the same weights, in training mode, same batch and targets, same seed."""
    _, reference_model = model_reference_checkpoint(model_config_kwargs(no_object_weight=0.2))
    # At initialisation sampling_offsets.weight is zero, so every deformable-attention sampling point sits exactly
    # on a pixel centre, where bilinear sampling has a kink: its gradient there flips with 1e-7 changes of the
    # point. Moving the points off the kinks makes the gradient comparison well-posed.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        for name, parameter in reference_model.named_parameters():
            if "sampling_offsets" in name:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    directory = tmp_path / "reference-off-the-kinks"
    reference_model.save_pretrained(directory)
    our_model = m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(directory)
    assert our_model.criterion.empty_weight.tolist() == pytest.approx([1.0] * NUM_LABELS + [0.2])
    pixel_values, pixel_mask = model_padded_batch([(64, 64), (64, 48), (48, 64)])
    mask_labels, class_labels = make_targets(torch.Generator().manual_seed(8), [3, 0, 2], [(64, 64)] * 3)

    losses = []
    for model in (reference_model, our_model):
        model.train()
        model.zero_grad()
        torch.manual_seed(11)
        output = model(pixel_values, pixel_mask=pixel_mask, mask_labels=mask_labels, class_labels=class_labels)
        output.loss.backward()
        losses.append(output.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=TOLERANCE, rtol=0)

    from m2f_model.checkpoints import to_our_key

    # transformers' in-memory parameter names, renamed to ours by the checkpoint loader's own table.
    reference_gradients = {to_our_key(name): p.grad for name, p in reference_model.named_parameters()
                           if p.grad is not None}
    our_gradients = {name: p.grad for name, p in our_model.named_parameters() if p.grad is not None}
    assert set(our_gradients) == set(reference_gradients)
    assert len(our_gradients) > 50
    for name, reference_gradient in reference_gradients.items():
        torch.testing.assert_close(our_gradients[name], reference_gradient, atol=TOLERANCE, rtol=0, msg=name)


def test_half_precision_logits_under_autocast_give_finite_losses_close_to_float32():
    generator = torch.Generator().manual_seed(9)
    masks, classes, auxiliary = make_predictions(generator, 2, num_auxiliary=1)
    mask_labels, class_labels = make_targets(generator, [3, 1], [(48, 48)] * 2)
    loss_module = ours.Mask2FormerLoss(our_config(make_config()), WEIGHT_DICT)

    torch.manual_seed(0)
    full_precision = loss_module(masks, classes, mask_labels, class_labels, auxiliary)
    half_auxiliary = [{key: value.bfloat16() for key, value in entry.items()} for entry in auxiliary]
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half_precision = loss_module(masks.bfloat16(), classes.bfloat16(), mask_labels, class_labels, half_auxiliary)
    for name, value in full_precision.items():
        assert torch.isfinite(half_precision[name])
        assert abs(half_precision[name].float().item() - value.item()) < 0.05 * max(1.0, abs(value.item())), name
