"""Fine-tuning on Ray Train with 2 CPU workers: the loss falls, checkpoints load, a killed worker resumes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tiny_checkpoints import TINY_CONFIG_KWARGS, save_tiny_checkpoint
from training.shapes import ShapesConfig, write_shapes_dataset
from training.train_loop import (FinetuneConfig, _batches_of_epoch, build_model_and_processor, poly_lr_factor)

SHAPES_ID2LABEL = {0: "circle", 1: "square", 2: "triangle", 3: "sky", 4: "ground"}


@pytest.fixture(scope="module")
def train_tiny_shapes(tmp_path_factory) -> Path:
    """Four 64x64 training images: with 2 workers x batch 2 every step sees the same four images."""
    return write_shapes_dataset(tmp_path_factory.mktemp("train-shapes"), splits={"train": 4, "val": 2}, seed=1,
                                config=ShapesConfig(image_size=64, min_object_size=16, max_object_size=28,
                                                    min_visible_pixels=60))


@pytest.fixture(scope="module")
def train_ray():
    import ray

    from pipeline.local_ray import start_local_ray

    if ray.is_initialized():  # the pipeline tests' session-wide Ray; start a fresh one for these tests
        ray.shutdown()
    start_local_ray(num_cpus=2, configure_logging=False)
    yield ray
    ray.shutdown()


def _tiny_config(data: Path | str, **overrides) -> FinetuneConfig:
    model_config = {k: v for k, v in TINY_CONFIG_KWARGS.items() if k != "num_labels"}
    values = dict(data=str(data), model_config=model_config, image_size=64, batch_size=2, max_steps=8,
                  learning_rate=1e-3, backbone_lr_multiplier=1.0, warmup_steps=1, poly_power=0.0,
                  augment=False, checkpoint_every=4, seed=0)
    values.update(overrides)
    return FinetuneConfig(**values)


def test_poly_schedule_warms_up_linearly_then_decays_to_zero():
    factors = [poly_lr_factor(step, total_steps=110, warmup_steps=10, power=0.9) for step in range(111)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.5 ** 0.9)
    assert factors[110] == 0.0
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_workers_read_disjoint_shards_of_one_shuffled_epoch():
    shards = [_batches_of_epoch(10, epoch=3, rank=rank, world_size=2, batch_size=2, seed=0) for rank in (0, 1)]
    seen = [index for shard in shards for batch in shard for index in batch]
    assert len(seen) == len(set(seen)) == 8
    assert shards[0] == _batches_of_epoch(10, epoch=3, rank=0, world_size=2, batch_size=2, seed=0)
    assert shards[0] != _batches_of_epoch(10, epoch=4, rank=0, world_size=2, batch_size=2, seed=0)


def test_init_from_a_different_label_set_reinitialises_only_the_class_head(tmp_path, train_tiny_shapes):
    from m2f_model import Mask2FormerForUniversalSegmentation

    source = save_tiny_checkpoint(tmp_path / "five-labels")
    original = Mask2FormerForUniversalSegmentation.from_pretrained(source).state_dict()
    new_labels = {0: "cat", 1: "dog", 2: "grass"}
    model, processor = build_model_and_processor(FinetuneConfig(data=str(train_tiny_shapes), init_from=str(source)),
                                                 new_labels)
    state = model.state_dict()
    assert model.config.id2label == new_labels
    assert state["class_predictor.weight"].shape == (4, TINY_CONFIG_KWARGS["hidden_dim"])
    assert processor.size == {"height": 64, "width": 64}  # the checkpoint's own preprocessor_config.json
    kept = [k for k in original if not k.startswith(("class_predictor.", "criterion."))]
    assert kept and all(torch.equal(state[k], original[k]) for k in kept)


def test_init_from_the_same_label_set_keeps_the_class_head(tmp_path, train_tiny_shapes):
    from m2f_model import Mask2FormerForUniversalSegmentation

    source = save_tiny_checkpoint(tmp_path / "same")
    original = Mask2FormerForUniversalSegmentation.from_pretrained(source).state_dict()
    model, _ = build_model_and_processor(FinetuneConfig(data=str(train_tiny_shapes), init_from=str(source)),
                                         dict(SHAPES_ID2LABEL))
    assert torch.equal(model.state_dict()["class_predictor.weight"], original["class_predictor.weight"])


def test_two_ray_workers_lower_the_loss_and_export_a_loadable_model(tmp_path, train_ray, train_tiny_shapes):
    from m2f_model import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor
    from training.finetune import run_finetune

    result = run_finetune(_tiny_config(train_tiny_shapes), num_workers=2, storage_path=str(tmp_path / "runs"),
                          name="lower-loss", output_model=str(tmp_path / "model"))
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    assert [row["step"] for row in history] == list(range(1, 9))
    assert {"loss", "loss_cross_entropy", "loss_mask", "loss_dice", "loss_auxiliary"} <= set(history[0])
    first, last = history[0]["loss"], sum(row["loss"] for row in history[-2:]) / 2
    assert last < 0.95 * first, f"loss went {first:.2f} -> {last:.2f}"
    assert (tmp_path / "model" / "loss_curve.png").stat().st_size > 1000

    exported = tmp_path / "model"
    config = json.loads((exported / "config.json").read_text())
    assert {int(k): v for k, v in config["id2label"].items()} == SHAPES_ID2LABEL
    assert json.loads((exported / "preprocessor_config.json").read_text())["size"] == {"height": 64, "width": 64}
    assert sorted(p.name for p in (tmp_path / "runs" / "lower-loss").glob("checkpoint_0*")) == [
        "checkpoint_0000004", "checkpoint_0000008"]

    # checkpoint -> load -> same outputs: the exported model equals the run's last checkpoint.
    with result.checkpoint.as_directory() as directory:
        from_checkpoint = Mask2FormerForUniversalSegmentation.from_pretrained(directory)
    from_export = Mask2FormerForUniversalSegmentation.from_pretrained(exported)
    processor = Mask2FormerImageProcessor.from_pretrained(exported)
    image = torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8).numpy()
    pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        a, b = from_checkpoint(pixel_values=pixel_values), from_export(pixel_values=pixel_values)
    assert torch.equal(a.class_queries_logits, b.class_queries_logits)
    assert torch.equal(a.masks_queries_logits, b.masks_queries_logits)


@pytest.fixture(scope="module")
def train_s3_endpoint(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 for this module."""
    import sys

    repository_root = str(Path(__file__).resolve().parents[2])
    if repository_root not in sys.path:  # infra/ is not an installed package
        sys.path.insert(0, repository_root)
    from infra.local_stack import start_s3_endpoint, stop_s3_endpoint

    endpoint = start_s3_endpoint(log_dir=tmp_path_factory.mktemp("train-moto"))
    yield endpoint
    stop_s3_endpoint(endpoint)


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_last_s3_checkpoint_with_its_step_and_optimizer(
        tmp_path, train_ray, train_tiny_shapes, train_s3_endpoint):
    import s3fs

    from training.finetune import run_finetune

    storage_options = train_s3_endpoint.storage_options()
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, **storage_options)
    filesystem.mkdir("train-resume")
    filesystem.put(f"{train_tiny_shapes}/", "train-resume/shapes", recursive=True)

    marker = tmp_path / "killed.txt"
    config = _tiny_config("s3://train-resume/shapes", max_steps=5, checkpoint_every=2,
                          storage_options=storage_options, extra={"fail_at_step": 3, "fail_marker": str(marker)})
    result = run_finetune(config, num_workers=2, storage_path="s3://train-resume/runs", name="resume",
                          max_failures=1, output_model=str(tmp_path / "model"))
    assert marker.read_text() == "killed at step 3"
    assert sorted(path.rsplit("/", 1)[-1] for path in filesystem.ls("train-resume/runs/resume")
                  if "/checkpoint_0" in path) == ["checkpoint_0000004", "checkpoint_0000005"]
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / "training_state.pt", map_location="cpu", weights_only=False)
        history = json.loads((Path(directory) / "history.json").read_text())
    assert state["step"] == 5
    # Steps 1-2 come from before the kill (restored from checkpoint_0000002), 3-5 from the restarted workers.
    assert [row["step"] for row in history] == [1, 2, 3, 4, 5]
    # AdamW counted 5 updates: its state came back from the checkpoint instead of starting over.
    assert all(float(s["step"]) == 5 for s in state["optimizer"]["state"].values())
    assert state["scheduler"]["last_epoch"] == 5
    assert (tmp_path / "model" / "model.safetensors").is_file()
