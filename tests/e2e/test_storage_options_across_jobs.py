"""`--storage-options '{"endpoint_url": ...}'`, the AWS_* variables and the older client_kwargs form reach the
loopback S3 endpoint alike from segment_bucket, finetune and evaluate: each job resolves them into the same
StorageConfig and every read and write goes through it."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from job_scripts import load_job
from pipeline.model_spec import resolve_model
from pipeline.listing import list_inputs
from pipeline.storage import StorageConfig
from tiny_checkpoints import save_tiny_checkpoint
from training.finetune import storage_for_ray
from training.loading import load_coco_dataset
from training.shapes import ShapesConfig, write_shapes_dataset
from training.train_loop import FinetuneConfig, _fixed_size_processor, local_directory

FORMS = ("flag", "environment", "client_kwargs_flag")


@pytest.fixture(scope="module")
def s3_dataset_and_model(s3_endpoint, tmp_path_factory) -> str:
    """A bucket holding a 3-image shapes dataset under data/ and a tiny model under model/."""
    import s3fs

    root = tmp_path_factory.mktemp("s3-forms")
    write_shapes_dataset(root / "data", splits={"val": 3}, seed=7,
                         config=ShapesConfig(image_size=64, min_object_size=16, max_object_size=28,
                                             min_visible_pixels=60))
    save_tiny_checkpoint(root / "model", seed=3)
    bucket = f"m2f-forms-{uuid.uuid4().hex[:10]}"
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, **s3_endpoint.storage_options())
    filesystem.mkdir(bucket)
    filesystem.put(str(root / "data"), f"{bucket}/data", recursive=True)
    filesystem.put(str(root / "model"), f"{bucket}/model", recursive=True)
    return bucket


@pytest.fixture(scope="module")
def evaluation_by_form() -> dict[str, dict]:
    return {}


def _flags(form: str, s3_endpoint, monkeypatch) -> list[str]:
    """The storage flags of one form; the environment form sets the AWS_* variables instead."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    if form == "environment":
        for name, value in s3_endpoint.client_env().items():
            monkeypatch.setenv(name, value)
        return []
    options = {"endpoint_url": s3_endpoint.endpoint_url, "key": s3_endpoint.access_key,
               "secret": s3_endpoint.secret_key}
    if form == "client_kwargs_flag":
        options = {**s3_endpoint.storage_options()}  # {"key", "secret", "client_kwargs": {"endpoint_url"}}
    return ["--storage-options", json.dumps(options)]


@pytest.mark.parametrize("form", FORMS)
def test_every_job_reaches_the_endpoint_with_each_form_of_the_settings(form, s3_endpoint, s3_dataset_and_model,
                                                                       evaluation_by_form, monkeypatch):
    bucket = s3_dataset_and_model
    flags = _flags(form, s3_endpoint, monkeypatch)

    # segment_bucket: what run_segmentation does with the storage before Ray starts (the full job on S3 runs in
    # test_segment_bucket_job.py).
    options = load_job("segment_bucket").parse_args(["--input", f"s3://{bucket}/data/val", "--model",
                                                     f"s3://{bucket}/model", *flags]).validated()
    storage = StorageConfig.resolve(options.storage_options)
    assert list_inputs(options.input, storage).num_rows == 3
    assert resolve_model(options.model, storage).id2label[3] == "sky"

    # finetune: the data, --init-from and the checkpoint storage of Ray Train.
    args = load_job("finetune").parse_args(["--data", f"s3://{bucket}/data", "--init-from", f"s3://{bucket}/model",
                                            "--storage-path", f"s3://{bucket}/runs", *flags])
    config = FinetuneConfig(data=args.data, init_from=args.init_from, storage_options=args.storage_options)
    assert FinetuneConfig(**config.to_dict()).storage == config.storage  # as the workers get it
    local, download = local_directory(config.init_from, config.storage)
    assert (Path(local) / "model.safetensors").is_file()
    download.cleanup()
    dataset = load_coco_dataset(config.data, "val", processor=_fixed_size_processor(64, 5), task="panoptic",
                                storage_options=config.storage)
    assert len(dataset) == 3 and dataset[0]["mask_labels"].shape[0] > 0
    path, filesystem = storage_for_ray(args.storage_path, config.storage)
    with filesystem.open_output_stream(f"{path}/{form}.txt") as handle:
        handle.write(b"checkpoint")
    assert storage.read_bytes(f"s3://{bucket}/runs/{form}.txt") == b"checkpoint"

    # evaluate: the model, the data and the report on S3.
    report = load_job("evaluate").main(["--model", f"s3://{bucket}/model", "--data", f"s3://{bucket}/data",
                                        "--threshold", "0", "--json", f"s3://{bucket}/eval-{form}.json", *flags])
    assert report["images_without_predictions"] == 0
    written = json.loads(storage.read_bytes(f"s3://{bucket}/eval-{form}.json"))
    assert written["panoptic"] == report["panoptic"]
    evaluation_by_form[form] = {task: report[task] for task in ("panoptic", "instance", "semantic")}
    assert all(scores == evaluation_by_form[form] for scores in evaluation_by_form.values())
