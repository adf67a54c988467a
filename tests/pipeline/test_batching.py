"""Batching never changes an image's result: what the stages produce for an image inside a mixed batch equals
single-image inference + post-processing (the model ignores pixel_mask, so padding a small image into a batch
would not); only uint8 pixels go into the model stage and only run lengths come out."""
from __future__ import annotations

import functools
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline.device_postprocess import PostprocessSettings, segment_batch
from pipeline.inference import InferenceStage, group_by_shape
from pipeline.model_spec import resolve_model
from pipeline.preprocess import PreprocessStage
from pipeline.records import FETCHED_SCHEMA
from pipeline.rle import unpack_run_lengths
from pipeline.storage import StorageConfig
from pipeline_test_images import image_bytes, random_rgb

STORAGE = StorageConfig.resolve({}, environ={})
# (height, width): with shortest_edge 64 / longest 128 / divisor 32 these resize to three different shapes,
# and the first and last share one.
SIZES = [(50, 70), (80, 60), (64, 64), (45, 66)]
SETTINGS = PostprocessSettings(threshold=0.05, mask_threshold=0.5, overlap_threshold=0.2)


def stages(checkpoint):
    spec = resolve_model(str(checkpoint), STORAGE)
    return PreprocessStage(spec=spec), InferenceStage(spec=spec, storage=STORAGE, settings=SETTINGS)


@pytest.fixture(scope="module")
def aspect_preserving_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny model with a processor that keeps aspect ratios, so processed shapes differ per image."""
    from m2f_model import Mask2FormerImageProcessor

    directory = tmp_path_factory.mktemp("tiny-m2f-aspect")
    shutil.copytree(tiny_checkpoint, directory, dirs_exist_ok=True)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32, num_labels=5,
                              ignore_index=255).save_pretrained(directory)
    return directory


@functools.lru_cache(maxsize=4)
def load_direct_model(checkpoint: str):
    """The checkpoint's processor and model, loaded once per test module."""
    from m2f_model import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    return (Mask2FormerImageProcessor.from_pretrained(checkpoint),
            Mask2FormerForUniversalSegmentation.from_pretrained(checkpoint).eval())


def single_image_segments(checkpoint, image: Image.Image):
    processor, model = load_direct_model(str(checkpoint))
    with torch.inference_mode():
        outputs = model(pixel_values=processor(images=[image], return_tensors="pt")["pixel_values"])
    return segment_batch(outputs.class_queries_logits, outputs.masks_queries_logits, [(image.height, image.width)],
                         SETTINGS)[0]


def fetched_batch(images: list[np.ndarray]) -> pa.Table:
    rows = [{"image_uri": f"/img{i}.png", "image_id": f"img{i}.png", "data": image_bytes(a), "error_stage": None,
             "error_type": None, "error_message": None} for i, a in enumerate(images)]
    return pa.Table.from_pylist(rows, schema=FETCHED_SCHEMA)


def test_group_by_shape_keeps_first_appearance_order_and_skips_failed_rows():
    groups = group_by_shape([[3, 64, 96], [3, 96, 64], None, [3, 64, 96]])
    assert groups == {(3, 64, 96): [0, 3], (3, 96, 64): [1]}


def test_each_image_in_a_mixed_batch_gets_its_single_image_result(aspect_preserving_checkpoint):
    arrays = [random_rgb(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    preprocess, inference = stages(aspect_preserving_checkpoint)
    preprocessed = preprocess(fetched_batch(arrays))
    assert preprocessed.schema.field("pixels").type == pa.large_binary()
    shapes = [tuple(s) for s in preprocessed["pixel_shape"].to_pylist()]
    assert len(set(shapes)) == 3 and shapes[0] == shapes[3], "the batch must mix shapes for this test"
    assert [len(p) for p in preprocessed["pixels"].to_pylist()] == [int(np.prod(s)) for s in shapes], "uint8"
    segmented = inference(preprocessed)
    assert not any("float" in str(field.type) and "list" not in str(field.type) for field in segmented.schema)
    for array, row in zip(arrays, segmented.to_pylist()):
        assert (row["height"], row["width"]) == array.shape[:2]
        expected = single_image_segments(aspect_preserving_checkpoint, Image.fromarray(array))
        assert row["segment_task"] == expected.task and row["segment_id"] == expected.segment_id
        assert row["segment_label_id"] == expected.label_id
        np.testing.assert_allclose([s or 0 for s in row["segment_score"]], [s or 0 for s in expected.score],
                                   atol=1e-5)
        runs = unpack_run_lengths(row["run_lengths"])
        assert np.array_equal(runs, np.concatenate(expected.run_lengths))
        assert row["segment_runs"] == [len(r) for r in expected.run_lengths]


def test_padding_into_a_larger_batch_would_change_the_result(aspect_preserving_checkpoint):
    """Why the stages group by shape: the model gives a padded image different logits."""
    processor, model = load_direct_model(str(aspect_preserving_checkpoint))
    small, large = Image.fromarray(random_rgb(*SIZES[0], seed=0)), Image.fromarray(random_rgb(*SIZES[1], seed=1))
    padded = processor(images=[small, large], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        padded_logits = model(pixel_values=padded).class_queries_logits[0].numpy()
    with torch.inference_mode():
        alone_logits = model(pixel_values=processor(images=[small], return_tensors="pt")["pixel_values"]
                             ).class_queries_logits[0].numpy()
    assert np.abs(padded_logits - alone_logits).max() > 1e-3


def test_failed_rows_pass_through_inference_untouched(tiny_checkpoint):
    preprocess, inference = stages(tiny_checkpoint)
    batch = fetched_batch([random_rgb(30, 30)])
    broken = pa.Table.from_pylist([{**batch.to_pylist()[0], "image_uri": "/bad.png", "data": b"not an image"}],
                                  schema=FETCHED_SCHEMA)
    segmented = inference(preprocess(pa.concat_tables([broken, batch]))).to_pylist()
    assert segmented[0]["error_stage"] == "decode" and segmented[0]["run_lengths"] is None
    assert segmented[1]["error_stage"] is None and segmented[1]["run_lengths"] is not None
