"""Parity of m2f_model's Mask2Former with transformers 5.24 (the reference), on random weights.

transformers builds and saves a model; m2f_model loads the directory; both run the same padded batch of two
differently-sized images (with its pixel_mask) in eval mode; every output field must agree within 1e-4.
"""
from __future__ import annotations

import pytest
import torch

import m2f_model

# (id, Swin overrides, Mask2Former overrides, image sizes of the batch)
PARITY_CASES = [
    ("tiny-window4", {}, {}, [(70, 93), (64, 50)]),
    ("window7-odd-depths", {"window_size": 7, "depths": [2, 1, 3, 1], "embed_dim": 24, "num_heads": [2, 3, 3, 4]},
     {"num_queries": 6}, [(97, 131), (80, 75)]),
    ("window3-pre-norm", {"window_size": 3, "depths": [1, 2, 1, 1]},
     {"pre_norm": True, "decoder_layers": 4, "num_queries": 5}, [(45, 61), (58, 39)]),
    ("projection-feature64-hidden32", {"window_size": 5},
     {"feature_size": 64, "mask_feature_size": 64, "decoder_layers": 2}, [(66, 66), (40, 71)]),
    ("enforced-projection-window6", {"window_size": 6, "mlp_ratio": 2.0},
     {"enforce_input_projection": True, "num_attention_heads": 4, "encoder_layers": 1, "decoder_layers": 5,
      "num_queries": 11}, [(100, 52), (33, 90)]),
    ("one-image-exact-multiple", {}, {"num_labels": 3}, [(64, 64)]),
    ("three-images-tiny-and-wide", {"window_size": 7, "embed_dim": 32, "num_heads": [2, 2, 4, 4]},
     {"num_labels": 20, "num_queries": 12}, [(33, 35), (48, 150), (90, 41)]),
    ("stage-maps-smaller-than-window", {"window_size": 7, "depths": [2, 2, 2, 2]}, {"dim_feedforward": 32},
     [(36, 30), (29, 44)]),
]


def _run(model: torch.nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, **flags):
    with torch.no_grad():
        return model(pixel_values, pixel_mask=pixel_mask, **flags)


@pytest.mark.parametrize("backbone, overrides, sizes", [case[1:] for case in PARITY_CASES],
                         ids=[case[0] for case in PARITY_CASES])
def test_every_output_field_matches_transformers_on_a_padded_batch(backbone, overrides, sizes,
                                                                   model_config_kwargs, model_reference_checkpoint,
                                                                   model_padded_batch, model_assert_outputs_close):
    directory, reference = model_reference_checkpoint(model_config_kwargs(backbone, **overrides))
    ours = m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(directory)
    pixel_values, pixel_mask = model_padded_batch(sizes)
    flags = {"output_hidden_states": True, "output_attentions": True, "output_auxiliary_logits": True}

    expected = _run(reference, pixel_values, pixel_mask, **flags)
    actual = _run(ours, pixel_values, pixel_mask, **flags)

    assert "attentions" in expected.keys() and "auxiliary_logits" in expected.keys()
    model_assert_outputs_close(expected, actual)


def test_default_outputs_match_transformers_without_optional_fields(model_config_kwargs, model_reference_checkpoint,
                                                                    model_padded_batch, model_assert_outputs_close):
    directory, reference = model_reference_checkpoint(model_config_kwargs())
    ours = m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(directory)
    pixel_values, pixel_mask = model_padded_batch([(61, 77), (77, 61)])

    expected = _run(reference, pixel_values, pixel_mask)
    actual = _run(ours, pixel_values, pixel_mask)

    assert actual.auxiliary_logits is None and actual.encoder_hidden_states is None
    model_assert_outputs_close(expected, actual)


def test_tuple_output_matches_transformers_order(model_config_kwargs, model_reference_checkpoint,
                                                 model_padded_batch):
    directory, reference = model_reference_checkpoint(model_config_kwargs())
    ours = m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(directory)
    pixel_values, _ = model_padded_batch([(64, 72)])

    expected = _run(reference, pixel_values, None, return_dict=False, output_hidden_states=True)
    actual = _run(ours, pixel_values, None, return_dict=False, output_hidden_states=True)

    assert isinstance(actual, tuple) and len(actual) == len(expected)
    for index, (e, a) in enumerate(zip(expected, actual)):
        if isinstance(e, torch.Tensor):
            assert torch.allclose(e, a, atol=1e-4), f"tuple entry {index} differs"
        else:
            assert len(e) == len(a), f"tuple entry {index} has {len(a)} items, expected {len(e)}"


def test_base_model_outputs_match_transformers_mask2former_model(model_config_kwargs, model_reference_checkpoint,
                                                                 model_padded_batch, model_assert_outputs_close):
    directory, reference = model_reference_checkpoint(model_config_kwargs(decoder_layers=4), base=True)
    ours = m2f_model.Mask2FormerModel.from_pretrained(directory)
    pixel_values, pixel_mask = model_padded_batch([(52, 68), (68, 40)])
    flags = {"output_hidden_states": True, "output_attentions": True}

    expected = _run(reference, pixel_values, pixel_mask, **flags)
    actual = _run(ours, pixel_values, pixel_mask, **flags)

    assert len(actual.masks_queries_logits) == 4  # initial queries + (decoder_layers - 1) layers
    model_assert_outputs_close(expected, actual)


def test_pixel_mask_is_ignored_like_transformers(model_config_kwargs, model_reference_checkpoint,
                                                 model_padded_batch):
    directory, _ = model_reference_checkpoint(model_config_kwargs())
    ours = m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(directory)
    pixel_values, pixel_mask = model_padded_batch([(64, 80), (40, 48)])

    with_mask = _run(ours, pixel_values, pixel_mask)
    without_mask = _run(ours, pixel_values, None)

    assert torch.equal(with_mask.masks_queries_logits, without_mask.masks_queries_logits)


def test_loss_with_labels_matches_transformers_under_the_same_seed(model_config_kwargs, model_reference_checkpoint,
                                                                   model_padded_batch):
    directory, reference = model_reference_checkpoint(model_config_kwargs())
    ours = m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(directory)
    pixel_values, _ = model_padded_batch([(64, 64), (64, 64)])
    generator = torch.Generator().manual_seed(3)
    mask_labels = [(torch.rand(2, 64, 64, generator=generator) > 0.5).float(),
                   (torch.rand(3, 64, 64, generator=generator) > 0.5).float()]
    class_labels = [torch.tensor([0, 3]), torch.tensor([1, 4, 2])]

    torch.manual_seed(11)
    expected = reference(pixel_values, mask_labels=mask_labels, class_labels=class_labels)
    torch.manual_seed(11)
    actual = ours(pixel_values, mask_labels=mask_labels, class_labels=class_labels)

    assert actual.loss is not None and actual.loss.ndim == 0
    assert abs(actual.loss.item() - expected.loss.item()) <= 1e-4 * max(1.0, abs(expected.loss.item()))


def test_loss_backpropagates_to_every_trainable_weight(model_config_kwargs):
    torch.manual_seed(0)
    model = m2f_model.Mask2FormerForUniversalSegmentation(m2f_model.Mask2FormerConfig(**model_config_kwargs()))
    model.train()
    pixel_values = torch.randn(2, 3, 64, 64)
    mask_labels = [(torch.rand(2, 64, 64) > 0.5).float(), (torch.rand(1, 64, 64) > 0.5).float()]
    class_labels = [torch.tensor([0, 3]), torch.tensor([4])]

    model(pixel_values, mask_labels=mask_labels, class_labels=class_labels).loss.backward()

    without_gradient = [name for name, p in model.named_parameters() if p.grad is None]
    assert without_gradient == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_is_no_larger_than_transformers(dtype, model_config_kwargs, model_reference_checkpoint):
    directory, reference = model_reference_checkpoint(model_config_kwargs())
    ours = m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(directory)
    pixel_values = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def mean_relative_error(model: torch.nn.Module) -> dict[str, float]:
        with torch.no_grad():
            full = model.float()(pixel_values)
            half = model.to(dtype)(pixel_values.to(dtype))
        assert half.masks_queries_logits.dtype == dtype
        errors = {}
        for field in ("class_queries_logits", "masks_queries_logits"):
            expected, actual = getattr(full, field), getattr(half, field).float()
            errors[field] = ((actual - expected).abs().mean() / expected.abs().mean()).item()
        return errors

    reference_errors = mean_relative_error(reference)
    our_errors = mean_relative_error(ours)

    for field, reference_error in reference_errors.items():
        assert our_errors[field] <= 1.5 * reference_error + 1e-3, (field, our_errors[field], reference_error)


def test_our_save_pretrained_loads_in_transformers_with_identical_outputs(tmp_path, model_config_kwargs,
                                                                         model_padded_batch,
                                                                         model_assert_outputs_close):
    import transformers

    torch.manual_seed(0)
    config = m2f_model.Mask2FormerConfig(**model_config_kwargs({"window_size": 5}, feature_size=64))
    ours = m2f_model.Mask2FormerForUniversalSegmentation(config).eval()
    ours.save_pretrained(tmp_path / "ours")
    reference, loading_info = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(
        tmp_path / "ours", output_loading_info=True)
    pixel_values, pixel_mask = model_padded_batch([(50, 70), (70, 50)])
    flags = {"output_hidden_states": True, "output_auxiliary_logits": True}

    assert all(not keys for keys in loading_info.values()), loading_info
    model_assert_outputs_close(_run(reference.eval(), pixel_values, pixel_mask, **flags),
                               _run(ours, pixel_values, pixel_mask, **flags))


def test_fresh_model_initialisation_follows_transformers_distributions(model_config_kwargs):
    torch.manual_seed(0)
    model = m2f_model.Mask2FormerForUniversalSegmentation(
        m2f_model.Mask2FormerConfig(**model_config_kwargs(num_queries=100)))
    decoder = model.model.transformer_module
    deformable = model.model.pixel_level_module.decoder.encoder.layers[0].self_attn

    assert 0.8 < decoder.queries_features.weight.std().item() < 1.2  # nn.Embedding: N(0, 1)
    assert torch.count_nonzero(deformable.attention_weights.weight) == 0
    assert deformable.sampling_offsets.bias.abs().max().item() == 4.0  # rays out to n_points pixels
    assert abs(model.class_predictor.weight.std().item() - 0.02) < 0.005
    assert model.criterion.empty_weight[-1].item() == pytest.approx(0.1)


def test_deformable_sampling_equals_transformers_grid_sample_at_borders_and_far_outside():
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention as reference

    from m2f_model.pixel_decoder import LevelGeometry, multi_scale_deformable_attention

    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (6, 10), (12, 19)]
    batch, heads, head_dim, points = 2, 2, 4, 4
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(batch, tokens, heads, head_dim, generator=generator)
    weights = torch.rand(batch, tokens, heads, len(shapes), points, generator=generator)
    geometry = LevelGeometry(shapes, torch.device("cpu"), torch.float32)
    # offsets in pixels: random, exact borders (-0.5 / size - 0.5 from a pixel centre), integers, far outside
    offsets = 8 * torch.randn(batch, tokens, heads, len(shapes), points, 2, generator=generator)
    offsets[..., 0, :] = torch.randint(-3, 4, offsets[..., 0, :].shape, generator=generator).float()
    offsets[..., 1, :] = 1000.0
    sampling_pixels = geometry.reference_pixels + offsets
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)[:, None, :]  # (L, 1, 2)
    sampling_locations = (sampling_pixels + 0.5) / sizes  # transformers' normalised locations

    expected = reference(value, shapes, sampling_locations, weights)
    actual = multi_scale_deformable_attention(value, geometry, sampling_pixels, weights)

    assert torch.allclose(actual, expected, atol=1e-5), (actual - expected).abs().max()


def test_shape_caches_stay_bounded_and_do_not_leak_results_between_sizes(model_config_kwargs):
    from m2f_model.swin import SHAPE_CACHE_SIZE

    torch.manual_seed(0)
    model = m2f_model.Mask2FormerForUniversalSegmentation(m2f_model.Mask2FormerConfig(**model_config_kwargs())).eval()
    first_image = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        first = model(first_image).masks_queries_logits
        for size in range(33, 33 + SHAPE_CACHE_SIZE + 3):
            model(torch.randn(1, 3, size, size + 5))
        again = model(first_image).masks_queries_logits

    assert torch.equal(first, again)
    block = model.model.pixel_level_module.encoder.encoder.layers[0].blocks[0]
    assert len(block._geometry) <= SHAPE_CACHE_SIZE
    assert len(model.model.pixel_level_module.decoder.encoder._geometry_cache) <= SHAPE_CACHE_SIZE


@pytest.mark.parametrize("seed", range(4))
def test_randomly_drawn_configurations_match_transformers(seed, model_config_kwargs, model_reference_checkpoint,
                                                          model_padded_batch, model_assert_outputs_close):
    import random

    draw = random.Random(seed)
    backbone = {"window_size": draw.randint(3, 7), "depths": [draw.randint(1, 2) for _ in range(4)],
                "embed_dim": draw.choice([16, 24]), "num_heads": [1, 2, draw.choice([2, 4]), 4]}
    overrides = {"num_queries": draw.randint(3, 12), "decoder_layers": draw.randint(2, 5),
                 "pre_norm": draw.random() < 0.5, "feature_size": draw.choice([32, 64]),
                 "num_attention_heads": draw.choice([2, 4]), "encoder_layers": draw.randint(1, 2)}
    sizes = [(draw.randint(30, 90), draw.randint(30, 90)) for _ in range(draw.randint(1, 3))]
    directory, reference = model_reference_checkpoint(model_config_kwargs(backbone, **overrides), seed=seed)
    ours = m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(directory)
    pixel_values, pixel_mask = model_padded_batch(sizes, seed=seed)
    flags = {"output_hidden_states": True, "output_attentions": True, "output_auxiliary_logits": True}

    model_assert_outputs_close(_run(reference, pixel_values, pixel_mask, **flags),
                               _run(ours, pixel_values, pixel_mask, **flags))


def test_training_after_an_inference_mode_evaluation_still_backpropagates(model_config_kwargs):
    torch.manual_seed(0)
    model = m2f_model.Mask2FormerForUniversalSegmentation(m2f_model.Mask2FormerConfig(**model_config_kwargs()))
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        model.eval()(pixel_values)
    with torch.no_grad():
        model(pixel_values)

    model.train()
    mask_labels = [(torch.rand(1, 64, 64) > 0.5).float(), (torch.rand(2, 64, 64) > 0.5).float()]
    loss = model(pixel_values, mask_labels=mask_labels, class_labels=[torch.tensor([1]), torch.tensor([0, 2])]).loss
    loss.backward()

    assert torch.isfinite(loss) and model.model.pixel_level_module.decoder.level_embed.grad is not None
