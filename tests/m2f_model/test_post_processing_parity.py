"""Post-processing parity: m2f_model's three post-processors against transformers 5.24's, exactly.

Random logits with fixed seeds, shaped like real outputs (batch 2, 10 queries, 6 labels, 24x32 mask
logits), with some confident queries so that segments exist; plus a 133-label case that exercises
the semantic candidate-class shortcut.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput

from m2f_model import post_processing
from m2f_model.image_processing import Mask2FormerImageProcessor

NUM_QUERIES, NUM_LABELS, MASK_HEIGHT, MASK_WIDTH = 10, 6, 24, 32
TARGET_SIZES = [(50, 70), (33, 41)]


@pytest.fixture(scope="module")
def reference() -> transformers.Mask2FormerImageProcessor:
    transformers.logging.set_verbosity_error()
    return transformers.Mask2FormerImageProcessor()


@pytest.fixture(scope="module")
def ours() -> Mask2FormerImageProcessor:
    return Mask2FormerImageProcessor()


def random_outputs(seed: int, *, batch: int = 2, queries: int = NUM_QUERIES, labels: int = NUM_LABELS,
                   height: int = MASK_HEIGHT, width: int = MASK_WIDTH, confident_fraction: float = 0.5,
                   mask_scale: float = 3.0) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(batch, queries, labels + 1, generator=generator)
    confident = torch.rand(batch, queries, generator=generator) < confident_fraction
    chosen = torch.randint(0, labels, (batch, queries), generator=generator)
    class_logits.scatter_add_(2, chosen[..., None], (confident.float() * 6.0)[..., None])
    coarse = torch.randn(batch * queries, 1, height // 4, width // 4, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    mask_logits = mask_scale * smooth.view(batch, queries, height, width) + 0.5 * torch.randn(
        batch, queries, height, width, generator=generator)
    return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)


def assert_identical(expected, actual, path: str = "result") -> None:
    """Same structure, same Python types, tensors equal in dtype, shape and every value."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), path
        assert actual.dtype == expected.dtype, (path, actual.dtype, expected.dtype)
        assert actual.shape == expected.shape, (path, actual.shape, expected.shape)
        assert torch.equal(actual, expected), (path, int((actual != expected).sum()))
    elif hasattr(expected, "keys"):
        assert set(actual.keys()) == set(expected.keys()), path
        for key in expected.keys():
            assert_identical(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), (path, len(actual), len(expected))
        for index, (expected_item, actual_item) in enumerate(zip(expected, actual)):
            assert_identical(expected_item, actual_item, f"{path}[{index}]")
    else:
        assert type(actual) is type(expected) and actual == expected, (path, actual, expected)


# ------------------------------------------------------------------------------------ semantic
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target_sizes", [None, TARGET_SIZES], ids=["no-target", "target-sizes"])
def test_semantic_segmentation_matches_transformers(reference, ours, seed, target_sizes):
    outputs = random_outputs(seed)
    assert_identical(reference.post_process_semantic_segmentation(outputs, target_sizes=target_sizes),
                     ours.post_process_semantic_segmentation(outputs, target_sizes=target_sizes))


def test_semantic_segmentation_scores_match_transformers(reference, ours):
    outputs = random_outputs(3)
    expected = reference.post_process_semantic_segmentation(outputs, TARGET_SIZES, return_segmentation_scores=True)
    actual = ours.post_process_semantic_segmentation(outputs, TARGET_SIZES, return_segmentation_scores=True)
    for expected_item, actual_item in zip(expected, actual):
        assert_identical(expected_item.segmentation, actual_item.segmentation)
        assert_identical(expected_item.segmentation_scores, actual_item.segmentation_scores)


def _count_full_argmax_calls(monkeypatch) -> list:
    """Records each time semantic post-processing falls back to resizing and ranking every class."""
    calls = []
    original = post_processing._argmax_over_first_dim

    def recording(values):
        calls.append(values.shape)
        return original(values)

    monkeypatch.setattr(post_processing, "_argmax_over_first_dim", recording)
    return calls


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("target_sizes", [None, [(40, 56), (120, 90)]], ids=["no-target", "target-sizes"])
def test_semantic_likely_class_shortcut_matches_transformers_with_many_labels(reference, ours, seed, target_sizes,
                                                                              monkeypatch):
    # 133 labels, a few confident queries: most classes provably cannot win and are never resized.
    outputs = random_outputs(seed, queries=16, labels=133, height=12, width=16, confident_fraction=0.6,
                             mask_scale=8.0)
    full_argmax_calls = _count_full_argmax_calls(monkeypatch)
    assert_identical(reference.post_process_semantic_segmentation(outputs, target_sizes=target_sizes),
                     ours.post_process_semantic_segmentation(outputs, target_sizes=target_sizes))
    assert full_argmax_calls == [], "the shortcut never applied"


def test_semantic_shortcut_falls_back_when_every_class_could_win(reference, ours, monkeypatch):
    # Flat class probabilities: no class can be ruled out, all are resized and ranked.
    outputs = random_outputs(4, labels=20, confident_fraction=0.0)
    outputs.class_queries_logits.zero_()
    full_argmax_calls = _count_full_argmax_calls(monkeypatch)
    assert_identical(reference.post_process_semantic_segmentation(outputs, target_sizes=TARGET_SIZES),
                     ours.post_process_semantic_segmentation(outputs, target_sizes=TARGET_SIZES))
    assert len(full_argmax_calls) == 2


# ------------------------------------------------------------------------------------ instance
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.5, 0.2, 0.0, 0.8])
@pytest.mark.parametrize("target_sizes", [None, TARGET_SIZES], ids=["no-target", "target-sizes"])
@pytest.mark.parametrize("output_format", ["id-map", "coco-rle", "binary-maps"])
def test_instance_segmentation_matches_transformers(reference, ours, seed, threshold, target_sizes, output_format):
    outputs = random_outputs(seed)
    kwargs = {"threshold": threshold, "target_sizes": target_sizes,
              "return_coco_annotation": output_format == "coco-rle",
              "return_binary_maps": output_format == "binary-maps"}
    assert_identical(reference.post_process_instance_segmentation(outputs, **kwargs),
                     ours.post_process_instance_segmentation(outputs, **kwargs))


def test_instance_segmentation_with_no_segment_above_threshold_matches_transformers(reference, ours):
    outputs = random_outputs(5)
    outputs.class_queries_logits[..., -1] += 20.0  # everything is "no object"
    for kwargs in ({}, {"target_sizes": TARGET_SIZES}, {"return_binary_maps": True},
                   {"return_coco_annotation": True, "target_sizes": TARGET_SIZES}):
        expected = reference.post_process_instance_segmentation(outputs, **kwargs)
        assert_identical(expected, ours.post_process_instance_segmentation(outputs, **kwargs))
    assert expected[0]["segments_info"] == []


def test_instance_segmentation_ignores_mask_and_overlap_thresholds_like_transformers(ours):
    outputs = random_outputs(6)
    default = ours.post_process_instance_segmentation(outputs, target_sizes=TARGET_SIZES)
    changed = ours.post_process_instance_segmentation(outputs, mask_threshold=0.95, overlap_mask_area_threshold=0.1,
                                                      target_sizes=TARGET_SIZES)
    assert_identical(default, changed)
    honoured = post_processing.post_process_instance_segmentation(outputs, mask_threshold=0.95,
                                                                  target_sizes=TARGET_SIZES, use_mask_threshold=True)
    assert any(not torch.equal(a["segmentation"], b["segmentation"]) for a, b in zip(default, honoured))


def test_instance_ids_start_at_zero_with_minus_one_background(ours):
    outputs = random_outputs(0)
    result = ours.post_process_instance_segmentation(outputs, threshold=0.2)[0]
    ids = [segment["id"] for segment in result["segments_info"]]
    assert ids == list(range(len(ids))) and ids
    assert result["segmentation"].dtype == torch.float32 and result["segmentation"].shape == (384, 384)
    assert set(result["segmentation"].unique().tolist()) <= {-1.0, *map(float, ids)}
    assert all(segment["was_fused"] is False for segment in result["segments_info"])


@pytest.mark.parametrize("queries", [1, 2, 3])
def test_instance_segmentation_with_very_few_queries_matches_transformers(reference, ours, queries):
    outputs = random_outputs(11, queries=queries, confident_fraction=1.0)
    for threshold in (0.0, 0.3):
        assert_identical(reference.post_process_instance_segmentation(outputs, threshold=threshold),
                         ours.post_process_instance_segmentation(outputs, threshold=threshold))


def test_instance_segmentation_with_both_output_flags_is_rejected(ours):
    with pytest.raises(ValueError, match="both"):
        ours.post_process_instance_segmentation(random_outputs(0), return_coco_annotation=True,
                                                return_binary_maps=True)


# ------------------------------------------------------------------------------------ panoptic
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target_sizes", [None, TARGET_SIZES], ids=["no-target", "target-sizes"])
@pytest.mark.parametrize("label_ids_to_fuse", [None, {0, 1, 2}, set(range(NUM_LABELS))],
                         ids=["no-fuse", "fuse-some", "fuse-all"])
@pytest.mark.parametrize("thresholds", [(0.5, 0.5, 0.8), (0.3, 0.4, 0.5), (0.7, 0.6, 0.95), (0.2, 0.5, 0.0)],
                         ids=["defaults", "loose", "strict", "no-overlap-test"])
def test_panoptic_segmentation_matches_transformers(reference, ours, seed, target_sizes, label_ids_to_fuse,
                                                    thresholds):
    outputs = random_outputs(seed)
    threshold, mask_threshold, overlap = thresholds
    kwargs = {"threshold": threshold, "mask_threshold": mask_threshold, "overlap_mask_area_threshold": overlap,
              "label_ids_to_fuse": label_ids_to_fuse, "target_sizes": target_sizes}
    assert_identical(reference.post_process_panoptic_segmentation(outputs, **kwargs),
                     ours.post_process_panoptic_segmentation(outputs, **kwargs))


def test_panoptic_segmentation_with_no_query_kept_matches_transformers(reference, ours):
    outputs = random_outputs(7)
    outputs.class_queries_logits[0, :, -1] += 20.0  # image 0: only "no object"; image 1 keeps segments
    for target_sizes in (None, TARGET_SIZES):
        kwargs = {"threshold": 0.3, "overlap_mask_area_threshold": 0.0, "label_ids_to_fuse": set(),
                  "target_sizes": target_sizes}
        expected = reference.post_process_panoptic_segmentation(outputs, **kwargs)
        actual = ours.post_process_panoptic_segmentation(outputs, **kwargs)
        assert_identical(expected, actual)
        assert actual[0]["segments_info"] == [] and torch.all(actual[0]["segmentation"] == -1)
        assert actual[1]["segments_info"]


def test_panoptic_fused_queries_repeat_their_segment_entry_like_transformers(ours):
    outputs = random_outputs(8)
    result = ours.post_process_panoptic_segmentation(outputs, threshold=0.2, overlap_mask_area_threshold=0.0,
                                                     label_ids_to_fuse=set(range(NUM_LABELS)))
    for image in result:
        ids = [segment["id"] for segment in image["segments_info"]]
        assert min(ids) == 1 and image["segmentation"].dtype == torch.int32
        assert all(segment["was_fused"] for segment in image["segments_info"])
    assert any(len(image["segments_info"]) > len({s["id"] for s in image["segments_info"]}) for image in result)


def test_panoptic_id_after_a_fused_segment_collides_like_transformers(reference, ours):
    # Four queries, one quadrant each, classes 0, 1, 0, 2 with class 0 fused. The reference reuses
    # id 1 for the second class-0 query and then counts on from there, so the class-2 segment gets
    # id 2 again, the id of the class-1 segment: its documented quirk, kept by default.
    class_logits = torch.full((1, 4, 4), -10.0)
    for query, label in enumerate([0, 1, 0, 2]):
        class_logits[0, query, label] = 10.0
    mask_logits = torch.full((1, 4, 24, 32), -10.0)
    for query, (rows, cols) in enumerate([(slice(0, 12), slice(0, 16)), (slice(0, 12), slice(16, 32)),
                                          (slice(12, 24), slice(0, 16)), (slice(12, 24), slice(16, 32))]):
        mask_logits[0, query, rows, cols] = 10.0
    outputs = SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)
    expected = reference.post_process_panoptic_segmentation(outputs, label_ids_to_fuse={0})
    actual = ours.post_process_panoptic_segmentation(outputs, label_ids_to_fuse={0})
    assert_identical(expected, actual)
    assert [(s["id"], s["label_id"], s["was_fused"]) for s in actual[0]["segments_info"]] == [
        (1, 0, True), (2, 1, False), (1, 0, True), (2, 2, False)]
    fixed = post_processing.post_process_panoptic_segmentation(outputs, label_ids_to_fuse={0},
                                                               unique_segment_ids=True)[0]
    assert [(s["id"], s["label_id"]) for s in fixed["segments_info"]] == [(1, 0), (2, 1), (1, 0), (3, 2)]
    assert fixed["segmentation"][0, 0] == 1 and fixed["segmentation"][0, -1] == 2
    assert fixed["segmentation"][-1, 0] == 1 and fixed["segmentation"][-1, -1] == 3


# ------------------------------------------------------------------------------------ shared
def test_post_processors_upsample_through_384_by_default_and_skip_it_on_request(ours):
    outputs = random_outputs(0)
    assert ours.post_process_semantic_segmentation(outputs)[0].shape == (384, 384)
    direct = post_processing.post_process_semantic_segmentation(outputs, TARGET_SIZES, intermediate_size=None)
    assert direct[0].shape == TARGET_SIZES[0]
    class_probs = outputs.class_queries_logits.softmax(-1)[..., :-1]
    mask_probs = torch.nn.functional.interpolate(outputs.masks_queries_logits[:1], size=TARGET_SIZES[0],
                                                 mode="bilinear", align_corners=False).sigmoid()
    expected = torch.einsum("bqc,bqhw->bchw", class_probs[:1], mask_probs)[0].argmax(0)
    assert torch.equal(direct[0], expected)
    no_target = post_processing.post_process_instance_segmentation(outputs, intermediate_size=None)
    assert no_target[0]["segmentation"].shape == (MASK_HEIGHT, MASK_WIDTH)


def test_transformers_output_objects_are_accepted(reference, ours):
    raw = random_outputs(9)
    outputs = Mask2FormerForUniversalSegmentationOutput(class_queries_logits=raw.class_queries_logits,
                                                        masks_queries_logits=raw.masks_queries_logits)
    assert_identical(reference.post_process_panoptic_segmentation(outputs, label_ids_to_fuse={1}),
                     ours.post_process_panoptic_segmentation(outputs, label_ids_to_fuse={1}))


def test_post_processing_of_a_real_forward_matches_transformers(tiny_checkpoint, reference, ours):
    from m2f_model import Mask2FormerForUniversalSegmentation

    model = Mask2FormerForUniversalSegmentation.from_pretrained(tiny_checkpoint).eval()
    processor = Mask2FormerImageProcessor.from_pretrained(tiny_checkpoint)
    images = [torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(2)]
    with torch.no_grad():
        outputs = model(**processor(images))
    target_sizes = [(48, 80), (48, 80)]
    assert_identical(reference.post_process_semantic_segmentation(outputs, target_sizes=target_sizes),
                     ours.post_process_semantic_segmentation(outputs, target_sizes=target_sizes))
    for threshold in (0.0, 0.2):
        assert_identical(reference.post_process_instance_segmentation(outputs, threshold=threshold,
                                                                      target_sizes=target_sizes),
                         ours.post_process_instance_segmentation(outputs, threshold=threshold,
                                                                 target_sizes=target_sizes))
        assert_identical(reference.post_process_panoptic_segmentation(outputs, threshold=threshold,
                                                                      label_ids_to_fuse={3, 4},
                                                                      target_sizes=target_sizes),
                         ours.post_process_panoptic_segmentation(outputs, threshold=threshold,
                                                                 label_ids_to_fuse={3, 4}, target_sizes=target_sizes))


def test_wrong_target_sizes_or_outputs_are_rejected_with_a_reason(ours):
    with pytest.raises(ValueError, match="target sizes"):
        ours.post_process_semantic_segmentation(random_outputs(0), target_sizes=[(10, 10)])
    with pytest.raises(TypeError, match="class_queries_logits"):
        ours.post_process_instance_segmentation(object())


def test_rle_is_transformers_row_major_start_length_pairs():
    mask = torch.tensor([[0, 1, 1], [1, 0, 0], [1, 1, 1]])
    # row-major pixels: 0 1 1 1 0 0 1 1 1 -> runs of ones start at 1-based 2 (length 3) and 7 (length 3)
    assert post_processing.binary_mask_to_rle(mask) == [2, 3, 7, 3]
    segmentation = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
    assert post_processing.segmentation_to_rle(segmentation) == [[1, 1], [2, 2], [4, 1]]


def test_panoptic_without_label_ids_to_fuse_warns_like_transformers(ours, caplog):
    with caplog.at_level(logging.WARNING):
        ours.post_process_panoptic_segmentation(random_outputs(0))
    assert "label_ids_to_fuse" in caplog.text
