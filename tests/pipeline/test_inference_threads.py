"""The CPU model actor's thread policy: forward passes on the plan's torch threads, post-processing on one, in
whichever of the actor's threads a call runs (torch's thread count is per thread)."""
from __future__ import annotations

import threading

import pyarrow as pa
import torch

import pipeline.inference as inference_module
from pipeline.device_postprocess import PostprocessSettings
from pipeline.inference import CPU_POSTPROCESS_THREADS, InferenceStage
from pipeline.model_spec import resolve_model
from pipeline.preprocess import PreprocessStage
from pipeline.records import FETCHED_SCHEMA
from pipeline.storage import StorageConfig
from pipeline_test_images import image_bytes, random_rgb

STORAGE = StorageConfig.resolve({}, environ={})


def test_each_call_forwards_on_the_plan_threads_and_post_processes_on_one(tiny_checkpoint, monkeypatch):
    spec = resolve_model(str(tiny_checkpoint), STORAGE)
    before = torch.get_num_threads()
    try:
        stage = InferenceStage(spec=spec, storage=STORAGE, settings=PostprocessSettings(), torch_threads=2)
        preprocessed = PreprocessStage(spec=spec)(pa.Table.from_pylist(
            [{"image_uri": f"/{i}.png", "image_id": f"{i}.png", "data": image_bytes(random_rgb(40, 50, seed=i))}
             for i in range(2)], schema=FETCHED_SCHEMA))
        seen: dict[str, list[int]] = {"forward": [], "postprocess": []}
        model_forward, segment_batch = stage._model.forward, inference_module.segment_batch

        def recording_forward(*args, **kwargs):
            seen["forward"].append(torch.get_num_threads())
            return model_forward(*args, **kwargs)

        def recording_segment_batch(*args, **kwargs):
            seen["postprocess"].append(torch.get_num_threads())
            return segment_batch(*args, **kwargs)

        monkeypatch.setattr(stage._model, "forward", recording_forward)
        monkeypatch.setattr(inference_module, "segment_batch", recording_segment_batch)
        results = []

        def call_from_a_fresh_thread() -> None:
            torch.set_num_threads(1)  # as a thread that first ran torch while another call held one thread
            results.append(stage(preprocessed))
            results.append(torch.get_num_threads())

        worker = threading.Thread(target=call_from_a_fresh_thread)
        worker.start()
        worker.join()
        assert results[0].num_rows == 2 and results[0].column("error_stage").null_count == 2
        assert seen == {"forward": [2], "postprocess": [CPU_POSTPROCESS_THREADS]}
        assert results[1] == 2  # the plan's threads again after post-processing
    finally:
        torch.set_num_threads(before)
