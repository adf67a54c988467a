"""The CLI maps every flag onto the job's options and turns job-level failures into one clear line."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline.segment_job import REPO_ROOT

_spec = importlib.util.spec_from_file_location("segment_bucket", REPO_ROOT / "jobs" / "segment_bucket.py")
segment_bucket = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(segment_bucket)


def test_no_arguments_label_the_samples_with_the_shipped_model_into_out():
    options = segment_bucket.parse_args([]).validated()
    assert Path(options.input) == REPO_ROOT / "samples"
    assert Path(options.model) == REPO_ROOT / "models" / "m2f-shapes-tiny"
    assert Path(options.output) == REPO_ROOT / "out" / "samples-run"
    assert options.tasks == ("panoptic", "instance", "semantic") and not options.resume


def test_every_flag_reaches_the_options(tmp_path):
    options = segment_bucket.parse_args([
        "--input", "s3://b/in", "--output", "s3://b/out", "--model", "s3://b/model", "--tasks", "panoptic, semantic",
        "--threshold", "0.3", "--mask-threshold", "0.4", "--overlap-threshold", "0.7", "--label-ids-to-fuse", "3,4",
        "--batch-size", "8", "--preprocess-actors", "3", "--model-actors", "2", "--postprocess-actors", "5",
        "--dtype", "bfloat16", "--limit", "10", "--resume", "--storage-options", '{"endpoint_url": "http://x"}',
        "--overlays", "4", "--stall-timeout", "30", "--ray-address", "auto", "--images-per-file", "7",
        "--max-image-pixels", "1000", "--max-object-bytes", "2000", "--no-progress"]).validated()
    assert (options.input, options.output, options.model) == ("s3://b/in", "s3://b/out", "s3://b/model")
    assert options.tasks == ("panoptic", "semantic") and options.label_ids_to_fuse == (3, 4)
    assert (options.threshold, options.mask_threshold, options.overlap_threshold) == (0.3, 0.4, 0.7)
    assert (options.batch_size, options.preprocess_actors, options.model_actors, options.postprocess_actors) == \
        (8, 3, 2, 5)
    assert (options.dtype, options.limit, options.resume, options.overlays) == ("bfloat16", 10, True, 4)
    assert options.storage_options == {"endpoint_url": "http://x"}
    assert (options.stall_timeout, options.ray_address, options.images_per_file) == (30.0, "auto", 7)
    assert (options.max_image_pixels, options.max_object_bytes, options.show_progress) == (1000, 2000, False)


def test_unknown_task_and_contradicting_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        segment_bucket.parse_args(["--tasks", "panoptic,keypoints"])
    assert "choose one or more of panoptic,instance,semantic" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--resume and --overwrite"):
        segment_bucket.parse_args(["--resume", "--overwrite"]).validated()


@pytest.mark.parametrize("flag", ["--threshold", "--mask-threshold", "--overlap-threshold"])
def test_thresholds_outside_zero_one_are_refused_naming_the_flag(flag, capsys):
    with pytest.raises(SystemExit):
        segment_bucket.parse_args([flag, "1.5"])
    assert f"argument {flag}: 1.5 is outside [0, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"{flag} -0.1 is outside"):
        segment_bucket.SegmentationOptions(**{flag[2:].replace("-", "_"): -0.1}).validated()


def test_bad_label_ids_and_storage_json_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        segment_bucket.parse_args(["--label-ids-to-fuse", "3,sky"])
    assert "label ids as integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        segment_bucket.parse_args(["--storage-options", "{endpoint_url: x}"])
    assert "not valid JSON" in capsys.readouterr().err


def test_options_built_from_a_dict_of_strings_hold_typed_tuples():
    options = segment_bucket.SegmentationOptions(tasks="instance,panoptic", label_ids_to_fuse="4, 5").validated()
    assert options.tasks == ("instance", "panoptic") and options.label_ids_to_fuse == (4, 5)


def test_help_says_which_thresholds_do_not_affect_instance_segments(capsys):
    with pytest.raises(SystemExit):
        segment_bucket.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--mask-threshold and --overlap-threshold do not affect them" in help_text
    assert "panoptic only: mask probability" in help_text and "(instance: no effect)" in help_text


def test_missing_model_exits_1_with_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    code = segment_bucket.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                                "--model", str(tmp_path / "no-model")])
    assert code == 1
    error = capsys.readouterr().err
    assert "no-model" in error and "does not exist" in error


def test_embedded_ray_runs_on_loopback(ray_session):
    assert {node["NodeManagerAddress"] for node in ray_session.nodes()} == {"127.0.0.1"}
