"""The decode actors' output, built without per-row copies, holds exactly the processor's resized pixels: the same
bytes, shape and error rows as resizing each decoded image through the processor and packing it by hand."""
from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
from m2f_model import Mask2FormerImageProcessor
from pipeline.decode import decode_image
from pipeline.model_spec import resolve_model
from pipeline.preprocess import PreprocessStage
from pipeline.records import FETCHED_SCHEMA, PREPROCESSED_SCHEMA, binary_column_views
from pipeline.storage import StorageConfig
from pipeline_test_images import image_bytes, random_rgb

STORAGE = StorageConfig.resolve({}, environ={})


def test_preprocessed_pixels_are_the_processors_resize_and_error_rows_stay_null(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    for path in tiny_checkpoint.iterdir():
        (checkpoint / path.name).write_bytes(path.read_bytes())
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32, num_labels=5,
                              ignore_index=255).save_pretrained(checkpoint)
    spec = resolve_model(str(checkpoint), STORAGE)
    images = {"a": image_bytes(random_rgb(50, 70, seed=1)), "b": image_bytes(random_rgb(80, 60, seed=2), "JPEG"),
              "bad": b"not an image", "c": image_bytes(random_rgb(45, 66, seed=3))}
    rows = [{"image_uri": f"/{name}", "image_id": name, "data": data} for name, data in images.items()]
    rows.append({"image_uri": "/unread", "image_id": "unread", "data": None, "error_stage": "read",
                 "error_type": "FileNotFoundError", "error_message": "gone"})
    preprocessed = PreprocessStage(spec=spec)(pa.Table.from_pylist(rows, schema=FETCHED_SCHEMA))

    assert preprocessed.schema == PREPROCESSED_SCHEMA
    assert preprocessed["error_stage"].to_pylist() == [None, None, "decode", None, "read"]
    processor = spec.processor()
    pixels = binary_column_views(preprocessed.column("pixels"))
    for index, name in enumerate(images):
        if name == "bad":
            assert pixels[index] is None and preprocessed["pixel_shape"][index].as_py() is None
            continue
        image = decode_image(images[name])
        expected = processor.resize_images([image])[0].contiguous().numpy()
        assert preprocessed["pixel_shape"][index].as_py() == list(expected.shape)
        assert np.array_equal(pixels[index], expected.ravel())
        assert (preprocessed["width"][index].as_py(), preprocessed["height"][index].as_py()) == image.size
    assert pixels[4] is None
    assert pickle.loads(pickle.dumps(preprocessed, protocol=5)).equals(preprocessed)  # as Ray ships a block

