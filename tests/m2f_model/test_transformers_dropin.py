"""m2f_model used the way transformers' own tests use transformers 5.24 (the oracle): the same calls must work and
give the same results — configs edited in place, dtype keywords of from_pretrained, meta-device construction,
gradients of returned hidden states, the image processor's JSON API and its error wording, public signatures."""
from __future__ import annotations

import copy
import inspect
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import m2f_model
from m2f_model import Mask2FormerConfig, Mask2FormerImageProcessor, SwinConfig
from m2f_model.outputs import BatchFeature


def _edited_config(config_class):
    """transformers' model tests build a default config and shrink it by assigning attributes, backbone included."""
    config = config_class(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, encoder_feedforward_dim=64,
                          dim_feedforward=64, num_queries=10, num_labels=4, encoder_layers=2, feature_size=32,
                          mask_feature_size=32, train_num_points=64)
    config.backbone_config.embed_dim = 16
    config.backbone_config.depths = [1, 1, 1, 1]
    config.backbone_config.hidden_size = 16
    config.backbone_config.num_channels = 3
    config.backbone_config.num_heads = [1, 1, 2, 2]
    config.backbone_config.window_size = 4
    config.backbone_config.drop_path_rate = 0.0
    return config


def _training_batch(batch_size: int = 2, size: int = 64, num_targets: int = 3):
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    mask_labels = [(torch.rand(num_targets, size, size, generator=generator) > 0.5).float() for _ in range(batch_size)]
    class_labels = [torch.arange(num_targets) for _ in range(batch_size)]
    return pixel_values, mask_labels, class_labels


# ----------------------------------------------------------------------------------------------- configuration
def test_edited_backbone_hidden_size_is_kept_and_the_model_still_loads_in_transformers(tmp_path):
    ours = _edited_config(Mask2FormerConfig)
    reference = _edited_config(transformers.Mask2FormerConfig)
    assert ours.backbone_config.hidden_size == reference.backbone_config.hidden_size == 16
    assert ours.backbone_config.to_dict()["hidden_size"] == reference.backbone_config.to_dict()["hidden_size"]

    torch.manual_seed(0)
    model = m2f_model.Mask2FormerForUniversalSegmentation(ours).eval()
    model.save_pretrained(tmp_path)
    loaded, info = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path,
                                                                                    output_loading_info=True)

    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    pixel_values = _training_batch()[0]
    with torch.no_grad():
        expected = loaded.eval()(pixel_values).masks_queries_logits
        actual = model(pixel_values).masks_queries_logits
    assert (expected - actual).abs().max() <= 1e-4


@pytest.mark.parametrize("kwargs", [{}, {"embed_dim": 32, "depths": [2, 2, 2], "num_heads": [1, 2, 4]},
                                    {"hidden_size": 99, "num_layers": 7}])
def test_swin_derived_attributes_are_plain_attributes_like_transformers(kwargs):
    ours, reference = SwinConfig(**kwargs), transformers.SwinConfig(**kwargs)
    for config in (ours, reference):
        config.depths = [1, 1]  # transformers derives them once, at construction
        config.num_hidden_layers = 5

    assert ours.hidden_size == reference.hidden_size
    assert ours.num_layers == reference.num_layers == 5
    assert ours.stage_names == list(reference.stage_names)
    assert ours.to_dict()["hidden_size"] == reference.to_dict()["hidden_size"]


def test_setting_out_features_realigns_out_indices_like_transformers():
    ours, reference = SwinConfig(), transformers.SwinConfig()
    for config in (ours, reference):
        config.out_features = ["stage2", "stage4"]
    assert ours.out_indices == list(reference.out_indices) == [2, 4]
    for config in (ours, reference):
        config.out_indices = [1, 3]
    assert ours.out_features == list(reference.out_features) == ["stage1", "stage3"]


@pytest.mark.parametrize("kwargs", [{"torch_dtype": "float16"}, {"dtype": "bfloat16"}, {"dtype": torch.float16},
                                    {}])
def test_config_dtype_is_a_torch_dtype_in_memory_and_a_name_in_json(kwargs):
    ours, reference = Mask2FormerConfig(**kwargs), transformers.Mask2FormerConfig(**kwargs)

    assert ours.dtype == reference.dtype and ours.torch_dtype == reference.dtype
    assert ours.to_dict()["dtype"] == reference.to_dict()["dtype"]
    ours.torch_dtype = reference.torch_dtype = torch.bfloat16
    assert ours.dtype == reference.dtype == torch.bfloat16


def test_config_json_string_and_file_round_trip_like_config_tester(tmp_path):
    config = Mask2FormerConfig(num_queries=13, num_labels=3, dtype="float16")
    json_file = tmp_path / "config.json"

    assert json.loads(config.to_json_string())["num_queries"] == 13
    assert json.loads(config.to_json_string(use_diff=False))["output_hidden_states"] is False
    config.to_json_file(json_file)
    assert Mask2FormerConfig.from_json_file(json_file) == config
    reference = transformers.Mask2FormerConfig.from_json_file(json_file)
    assert reference.num_queries == 13 and reference.num_labels == 3 and reference.dtype == torch.float16
    assert config.save_pretrained(tmp_path / "saved") is None
    assert Mask2FormerConfig.from_pretrained(tmp_path / "saved").to_diff_dict() == config.to_diff_dict()


def test_from_pretrained_kwargs_override_attributes_and_return_the_unused_ones(tmp_path):
    Mask2FormerConfig(num_queries=13).save_pretrained(tmp_path)
    transformers_config = transformers.Mask2FormerConfig(num_queries=13)

    ours, ours_unused = Mask2FormerConfig.from_pretrained(
        tmp_path, num_queries=7, backbone_config={"window_size": 5}, not_a_field=1, return_unused_kwargs=True,
        local_files_only=True)
    reference, reference_unused = transformers.Mask2FormerConfig.from_dict(
        transformers_config.to_dict(), num_queries=7, backbone_config={"window_size": 5}, not_a_field=1,
        return_unused_kwargs=True)

    assert ours.num_queries == reference.num_queries == 7
    assert ours.backbone_config.window_size == reference.backbone_config.window_size == 5
    assert ours.backbone_config.depths == list(reference.backbone_config.depths)
    assert ours_unused == reference_unused == {"not_a_field": 1}
    assert not hasattr(ours, "not_a_field") and ours.name_or_path == str(tmp_path)


def test_update_sets_attributes_through_aliases():
    ours, reference = Mask2FormerConfig(), transformers.Mask2FormerConfig()
    for config in (ours, reference):
        config.update({"hidden_size": 64, "num_queries": 3})
    assert ours.hidden_dim == reference.hidden_dim == 64 and ours.num_queries == reference.num_queries == 3


# ----------------------------------------------------------------------------------------------- model loading
@pytest.fixture(scope="module")
def float16_reference_checkpoint(tmp_path_factory) -> Path:
    """transformers' tiny model saved in float16 (config.json then records dtype "float16")."""
    from tiny_checkpoints import tiny_config_kwargs

    torch.manual_seed(0)
    model = transformers.Mask2FormerForUniversalSegmentation(transformers.Mask2FormerConfig(**tiny_config_kwargs()))
    directory = tmp_path_factory.mktemp("float16-reference")
    model.to(torch.float16).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kwargs", [{}, {"dtype": "auto"}, {"torch_dtype": "float32"}, {"dtype": "bfloat16"},
                                    {"dtype": torch.float32}, {"torch_dtype": torch.bfloat16},
                                    {"dtype": "float32", "torch_dtype": "bfloat16"}],
                         ids=["default", "auto", "torch_dtype-name", "dtype-name", "dtype-object",
                              "torch_dtype-object", "dtype-wins"])
def test_from_pretrained_dtype_keywords_give_transformers_dtypes(float16_reference_checkpoint, kwargs):
    reference = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(float16_reference_checkpoint,
                                                                                 **kwargs)
    ours = m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(float16_reference_checkpoint, **kwargs)

    assert ours.dtype == reference.dtype
    assert ours.config.dtype == reference.config.dtype
    assert ours.criterion.empty_weight.dtype == reference.criterion.empty_weight.dtype
    assert not ours.training and not reference.training


@pytest.mark.parametrize("dtype", ["float17", 3])
def test_from_pretrained_rejects_what_transformers_rejects(float16_reference_checkpoint, dtype):
    with pytest.raises(ValueError):
        transformers.Mask2FormerForUniversalSegmentation.from_pretrained(float16_reference_checkpoint, dtype=dtype)
    with pytest.raises(ValueError, match="dtype"):
        m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(float16_reference_checkpoint, dtype=dtype)


def test_saved_half_model_records_its_dtype_and_auto_loads_it_in_both_libraries(tmp_path, tiny_checkpoint):
    model = m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(tiny_checkpoint).to(torch.bfloat16)
    model.save_pretrained(tmp_path)

    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path).dtype == torch.bfloat16
    assert transformers.Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path).dtype == torch.bfloat16


def test_from_pretrained_config_overrides_and_loading_info(tiny_checkpoint):
    model, info = m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(
        tiny_checkpoint, output_hidden_states=True, num_labels=3, ignore_mismatched_sizes=True,
        output_loading_info=True)

    assert model.config.output_hidden_states is True and model.class_predictor.out_features == 4
    assert model.name_or_path == str(tiny_checkpoint) and model.base_model is model.model
    assert sorted(key.split(":")[0] for key in info["mismatched_keys"]) == [
        "class_predictor.bias", "class_predictor.weight", "criterion.empty_weight"]
    with pytest.raises(TypeError, match="not_an_option"):
        m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(tiny_checkpoint, not_an_option=1)


def test_device_map_of_one_device_places_the_whole_model(tiny_checkpoint):
    expected = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")
    auto = m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(tiny_checkpoint, device_map="auto")
    cpu = m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(tiny_checkpoint, device_map="cpu")

    assert auto.device.type == expected.type and cpu.device == torch.device("cpu")
    with pytest.raises(ValueError, match="device_map"):
        m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(tiny_checkpoint, device_map={"model": 0})


def test_save_pretrained_honours_is_main_process_and_a_given_state_dict(tmp_path, tiny_checkpoint):
    model = m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(tiny_checkpoint)
    model.save_pretrained(tmp_path / "worker", is_main_process=False)
    state_dict = {name: torch.zeros_like(tensor) if name == "class_predictor.bias" else tensor
                  for name, tensor in model.state_dict().items()}
    model.save_pretrained(tmp_path / "main", state_dict=state_dict)

    assert not (tmp_path / "worker").exists()
    reloaded = m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path / "main")
    assert torch.equal(reloaded.class_predictor.bias, torch.zeros_like(model.class_predictor.bias))


@pytest.mark.parametrize("model_name", ["Mask2FormerModel", "Mask2FormerForUniversalSegmentation"])
def test_meta_device_model_after_to_empty_and_init_weights_equals_a_normal_one(model_name, model_config_kwargs):
    model_class = getattr(m2f_model, model_name)
    config = Mask2FormerConfig(**model_config_kwargs())
    torch.manual_seed(0)
    normal = model_class(config).eval()
    with torch.device("meta"):
        lazy = model_class(config)
    lazy.to_empty(device="cpu")
    lazy.init_weights()
    lazy.load_state_dict(normal.state_dict())  # non-persistent buffers are not in a state dict
    lazy.eval()

    for (name, expected), (_, actual) in zip(normal.named_buffers(), lazy.named_buffers()):
        assert torch.equal(expected, actual), name
    pixel_values, mask_labels, class_labels = _training_batch()
    labels = {"mask_labels": mask_labels, "class_labels": class_labels} if model_name != "Mask2FormerModel" else {}
    torch.manual_seed(1)
    expected = normal(pixel_values, **labels)
    torch.manual_seed(1)
    actual = lazy(pixel_values, **labels)
    assert torch.equal(expected.masks_queries_logits[-1] if model_name == "Mask2FormerModel"
                       else expected.loss, actual.masks_queries_logits[-1] if model_name == "Mask2FormerModel"
                       else actual.loss)


def test_post_init_rebuilds_the_loss_weights_from_the_config():
    model = m2f_model.Mask2FormerForUniversalSegmentation(_edited_config(Mask2FormerConfig))
    model.criterion.empty_weight.fill_(7.0)
    model.post_init()
    assert model.criterion.empty_weight.tolist() == pytest.approx([1.0] * 4 + [0.1])


# ----------------------------------------------------------------------------------------------- gradients
def test_retain_grad_hidden_states_attentions_like_transformers():
    config = _edited_config(Mask2FormerConfig)
    config.output_hidden_states = True
    config.output_attentions = True
    model = m2f_model.Mask2FormerForUniversalSegmentation(config).train()
    pixel_values, mask_labels, class_labels = _training_batch()

    outputs = model(pixel_values, mask_labels=mask_labels, class_labels=class_labels)
    retained = {"encoder_hidden_states": outputs.encoder_hidden_states[0],
                "pixel_decoder_hidden_states": outputs.pixel_decoder_hidden_states[0],
                "transformer_decoder_hidden_states": outputs.transformer_decoder_hidden_states[0],
                "last_transformer_decoder_hidden_states": outputs.transformer_decoder_hidden_states[-1],
                "attentions": outputs.attentions[0]}
    for tensor in retained.values():
        tensor.retain_grad()
    outputs.loss.backward(retain_graph=True)

    assert [name for name, tensor in retained.items() if tensor.grad is None] == []


def test_base_model_intermediate_states_are_on_the_path_of_its_mask_logits():
    model = m2f_model.Mask2FormerModel(_edited_config(Mask2FormerConfig)).train()
    outputs = model(_training_batch()[0], output_hidden_states=True)
    intermediate = outputs.transformer_decoder_intermediate_states
    for tensor in intermediate:
        tensor.retain_grad()
    sum(logits.sum() for logits in outputs.masks_queries_logits).backward()

    assert all(tensor.grad is not None for tensor in intermediate)
    assert intermediate[0].shape == (10, 2, 32)  # (queries, batch, hidden) as in transformers


# ----------------------------------------------------------------------------------------------- image processor
PROCESSOR_KWARGS = [
    {},
    {"size": {"height": 384, "width": 384}, "ignore_index": 255, "num_labels": 5, "do_reduce_labels": True},
    {"image_mean": [0.5, 0.5, 0.5], "image_std": 0.5, "resample": 3, "pad_size": {"height": 64, "width": 64},
     "size": (100, 120), "do_convert_rgb": True},
]


@pytest.mark.parametrize("kwargs", PROCESSOR_KWARGS)
def test_processor_to_dict_equals_transformers_field_by_field_with_types(kwargs):
    expected = transformers.Mask2FormerImageProcessor(**copy.deepcopy(kwargs)).to_dict()
    actual = Mask2FormerImageProcessor(**copy.deepcopy(kwargs)).to_dict()

    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key] == value and type(actual[key]) is type(value), key


@pytest.mark.parametrize("kwargs", PROCESSOR_KWARGS[1:])
def test_processor_json_string_file_and_pretrained_round_trips(tmp_path, kwargs):
    processor = Mask2FormerImageProcessor(**copy.deepcopy(kwargs))
    reference = transformers.Mask2FormerImageProcessor(**copy.deepcopy(kwargs))

    assert json.loads(processor.to_json_string()) == json.loads(reference.to_json_string())
    processor.to_json_file(tmp_path / "processor.json")
    assert Mask2FormerImageProcessor.from_json_file(tmp_path / "processor.json").to_dict() == processor.to_dict()
    assert transformers.Mask2FormerImageProcessor.from_json_file(tmp_path / "processor.json").to_dict() == \
        reference.to_dict()
    written = processor.save_pretrained(tmp_path / "saved")
    assert written == [str(tmp_path / "saved" / "preprocessor_config.json")]
    assert [Path(path).name for path in reference.save_pretrained(tmp_path / "reference")] == \
        [Path(path).name for path in written]
    assert Mask2FormerImageProcessor.from_pretrained(tmp_path / "saved").to_dict() == processor.to_dict()


@pytest.mark.parametrize("shape", [(2, 10, 10), (5, 6, 7)])
def test_channel_layout_that_cannot_be_inferred_raises_transformers_error(shape):
    image = np.zeros(shape, dtype=np.uint8)
    with pytest.raises(ValueError, match="Unable to infer channel dimension format"):
        transformers.Mask2FormerImageProcessor()(image)
    with pytest.raises(ValueError, match="Unable to infer channel dimension format"):
        Mask2FormerImageProcessor()(image)


def test_ambiguous_channel_layout_warns_and_assumes_channels_first(caplog):
    with caplog.at_level(logging.WARNING, logger="m2f_model.image_processing"):
        encoded = Mask2FormerImageProcessor(size={"height": 32, "width": 32})(np.zeros((3, 10, 3), dtype=np.uint8))
    assert "The channel dimension is ambiguous" in caplog.text
    assert encoded["pixel_values"].shape == (1, 3, 32, 32)


def test_semantic_scores_come_back_in_the_processor_batch_feature(tiny_checkpoint):
    processor = Mask2FormerImageProcessor.from_pretrained(tiny_checkpoint)
    model = m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        outputs = model(**processor(np.zeros((40, 50, 3), dtype=np.uint8)))
    result = processor.post_process_semantic_segmentation(outputs, target_sizes=[(40, 50)],
                                                          return_segmentation_scores=True)[0]

    assert isinstance(result, BatchFeature) and result.segmentation.shape == (40, 50)
    assert result.to(torch.float64).segmentation_scores.dtype == torch.float64


# ----------------------------------------------------------------------------------------------- signatures
def _positional_names(function) -> list[str]:
    return [parameter.name for parameter in inspect.signature(function).parameters.values()
            if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and parameter.name not in ("self", "cls")]


SIGNATURE_PAIRS = [
    (transformers.Mask2FormerConfig.from_pretrained, Mask2FormerConfig.from_pretrained),
    (transformers.Mask2FormerConfig.from_dict, Mask2FormerConfig.from_dict),
    (transformers.Mask2FormerConfig.from_json_file, Mask2FormerConfig.from_json_file),
    (transformers.Mask2FormerConfig.to_json_file, Mask2FormerConfig.to_json_file),
    (transformers.Mask2FormerConfig.to_json_string, Mask2FormerConfig.to_json_string),
    (transformers.Mask2FormerConfig.save_pretrained, Mask2FormerConfig.save_pretrained),
    (transformers.Mask2FormerConfig.update, Mask2FormerConfig.update),
    (transformers.Mask2FormerModel.from_pretrained, m2f_model.Mask2FormerModel.from_pretrained),
    (transformers.Mask2FormerModel.save_pretrained, m2f_model.Mask2FormerModel.save_pretrained),
    (transformers.Mask2FormerModel.forward, m2f_model.Mask2FormerModel.forward),
    (transformers.Mask2FormerForUniversalSegmentation.forward,
     m2f_model.Mask2FormerForUniversalSegmentation.forward),
    (transformers.Mask2FormerForUniversalSegmentation.get_loss_dict,
     m2f_model.Mask2FormerForUniversalSegmentation.get_loss_dict),
    (transformers.Mask2FormerImageProcessor.from_pretrained, Mask2FormerImageProcessor.from_pretrained),
    (transformers.Mask2FormerImageProcessor.save_pretrained, Mask2FormerImageProcessor.save_pretrained),
    (transformers.Mask2FormerImageProcessor.from_dict, Mask2FormerImageProcessor.from_dict),
    (transformers.Mask2FormerImageProcessor.from_json_file, Mask2FormerImageProcessor.from_json_file),
    (transformers.Mask2FormerImageProcessor.to_json_file, Mask2FormerImageProcessor.to_json_file),
    (transformers.Mask2FormerImageProcessor.preprocess, Mask2FormerImageProcessor.preprocess),
    (transformers.Mask2FormerImageProcessor.preprocess, Mask2FormerImageProcessor.__call__),
    (transformers.Mask2FormerImageProcessor.post_process_semantic_segmentation,
     Mask2FormerImageProcessor.post_process_semantic_segmentation),
    (transformers.Mask2FormerImageProcessor.post_process_instance_segmentation,
     Mask2FormerImageProcessor.post_process_instance_segmentation),
    (transformers.Mask2FormerImageProcessor.post_process_panoptic_segmentation,
     Mask2FormerImageProcessor.post_process_panoptic_segmentation),
]


@pytest.mark.parametrize("theirs, ours", SIGNATURE_PAIRS, ids=[pair[1].__qualname__ for pair in SIGNATURE_PAIRS])
def test_positional_parameters_bind_like_transformers(theirs, ours):
    """Our positional parameters are transformers' (a prefix of them where transformers has more, e.g. Hub
    download options), so positional and keyword calls written for transformers bind the same arguments."""
    expected, actual = _positional_names(theirs), _positional_names(ours)
    assert actual == expected[:len(actual)] and actual, (actual, expected)


def test_model_from_pretrained_takes_transformers_loading_keywords():
    parameters = inspect.signature(m2f_model.Mask2FormerForUniversalSegmentation.from_pretrained).parameters
    assert {"config", "dtype", "torch_dtype", "device_map", "ignore_mismatched_sizes",
            "output_loading_info"} <= set(parameters)
