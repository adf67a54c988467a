"""The committed demo model (models/m2f-shapes-tiny): loads with m2f_model and with transformers, both give
the same outputs, and jobs/evaluate.py reproduces the model card's numbers on a slice of the val split."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.shapes import render_sample, write_shapes_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO_ROOT / "models" / "m2f-shapes-tiny"


def test_demo_model_directory_is_complete_and_small():
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "loss_curve.png"):
        assert (DEMO_MODEL / name).is_file(), name
    assert (DEMO_MODEL / "model.safetensors").stat().st_size <= 25 * 1024 * 1024
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    assert config["id2label"] == {"0": "circle", "1": "square", "2": "triangle", "3": "sky", "4": "ground"}
    assert json.loads((DEMO_MODEL / "preprocessor_config.json").read_text())["size"] == {"height": 128,
                                                                                         "width": 128}


def test_demo_model_gives_the_same_outputs_in_m2f_model_and_transformers():
    import transformers

    from m2f_model import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    ours = Mask2FormerForUniversalSegmentation.from_pretrained(DEMO_MODEL)
    theirs = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(DEMO_MODEL).eval()
    processor = Mask2FormerImageProcessor.from_pretrained(DEMO_MODEL)
    images = [render_sample(0, "val", index).image for index in range(2)]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]  # (2, 3, 128, 128)
    with torch.no_grad():
        a, b = ours(pixel_values=pixel_values), theirs(pixel_values=pixel_values)
    torch.testing.assert_close(a.class_queries_logits, b.class_queries_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.masks_queries_logits, b.masks_queries_logits, atol=1e-4, rtol=1e-4)


def test_evaluate_reproduces_the_model_cards_numbers_on_the_first_val_images(tmp_path):
    import importlib.util

    card = json.loads((DEMO_MODEL / "eval_val_first25.json").read_text())
    # The card's val split is `make_shapes_dataset.py --seed 0`; its first 25 images do not depend on --val.
    root = write_shapes_dataset(tmp_path / "shapes", splits={"val": 25}, seed=0)
    spec = importlib.util.spec_from_file_location("job_evaluate", REPO_ROOT / "jobs" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    report = evaluate.main(["--model", str(DEMO_MODEL), "--data", str(root), "--split", "val"])
    assert report["images"] == card["images"] == 25
    for task, key in (("panoptic", "all"), ("panoptic", "things"), ("panoptic", "stuff")):
        assert report[task][key]["pq"] == pytest.approx(card[task][key]["pq"], abs=0.05)
    assert report["instance"]["ap"] == pytest.approx(card["instance"]["ap"], abs=0.05)
    assert report["semantic"]["miou"] == pytest.approx(card["semantic"]["miou"], abs=0.05)
    assert np.isfinite(report["panoptic"]["all"]["sq"])
