"""The model resolved once on the driver: a small picklable spec, a stable model id, stages that never re-read
the checkpoint's JSON files."""
from __future__ import annotations

import pickle
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.device_postprocess import PostprocessSettings
from pipeline.inference import InferenceStage
from pipeline.model_spec import resolve_model
from pipeline.postprocess import PostprocessStage
from pipeline.preprocess import PreprocessStage
from pipeline.records import FETCHED_SCHEMA
from pipeline.storage import StorageConfig
from pipeline_test_images import image_bytes, random_rgb

STORAGE = StorageConfig.resolve({}, environ={})


def test_spec_is_small_picklable_and_carries_labels_and_settings(tiny_checkpoint):
    spec = resolve_model(str(tiny_checkpoint), STORAGE)
    assert len(pickle.dumps(spec)) < 20_000
    assert spec.id2label == {0: "circle", 1: "square", 2: "triangle", 3: "sky", 4: "ground"}
    assert spec.num_labels == 5 and spec.weights_bytes > 0
    assert spec.processor().to_dict() == spec.processor_config


def test_model_id_is_the_folder_name_and_a_weights_digest(tiny_checkpoint, tmp_path, save_tiny_checkpoint):
    copy = tmp_path / "renamed-model"
    shutil.copytree(tiny_checkpoint, copy)
    first, again = resolve_model(str(tiny_checkpoint), STORAGE), resolve_model(str(copy), STORAGE)
    assert re.fullmatch(re.escape(tiny_checkpoint.name) + r"@[0-9a-f]{12}", first.model_id)
    assert again.model_id == "renamed-model@" + first.model_id.split("@")[1], "same weights, same digest"
    other = resolve_model(str(save_tiny_checkpoint(tmp_path / "other", seed=3)), STORAGE)
    assert other.model_id.split("@")[1] != first.model_id.split("@")[1]


def test_stages_run_from_the_spec_without_the_json_files(tiny_checkpoint, tmp_path):
    local = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, local)
    spec = resolve_model(str(local), STORAGE)
    (local / "config.json").unlink()
    (local / "preprocessor_config.json").unlink()
    settings = PostprocessSettings(threshold=0.0)
    row = {"image_uri": "/a.png", "image_id": "a.png", "data": image_bytes(random_rgb(30, 40))}
    fetched = pa.Table.from_pylist([row], schema=FETCHED_SCHEMA)
    segmented = InferenceStage(spec=spec, storage=STORAGE, settings=settings)(PreprocessStage(spec=spec)(fetched))
    images = PostprocessStage(spec=spec, storage=STORAGE, output_uri=str(tmp_path / "out"), tasks=settings.tasks,
                              run_id="r")(segmented)
    assert images["status"].to_pylist() == ["ok"]
    written = pq.read_table(tmp_path / "out" / "segments")
    assert set(written["model"].to_pylist()) == {spec.model_id}
