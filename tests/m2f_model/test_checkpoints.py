"""Checkpoint loading/saving: the transformers name table, the weight-file formats, and clear errors."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import m2f_model
from m2f_model import CheckpointError, Mask2FormerForUniversalSegmentation, Mask2FormerModel
from m2f_model.checkpoints import (IGNORED_CHECKPOINT_KEYS, SAFETENSORS_NAME, _is_ignored, to_our_key,
                                   to_transformers_key)

BLOCK = "model.pixel_level_module.encoder.encoder.layers.1.blocks.0."


@pytest.mark.parametrize("transformers_key, our_key", [
    (BLOCK + "attention.self.query.weight", BLOCK + "attention.q_proj.weight"),
    (BLOCK + "attention.self.key.bias", BLOCK + "attention.k_proj.bias"),
    (BLOCK + "attention.self.value.weight", BLOCK + "attention.v_proj.weight"),
    (BLOCK + "attention.self.relative_position_bias_table", BLOCK + "attention.relative_position_bias_table"),
    (BLOCK + "attention.output.dense.weight", BLOCK + "attention.o_proj.weight"),
    (BLOCK + "intermediate.dense.bias", BLOCK + "mlp.fc1.bias"),
    (BLOCK + "output.dense.weight", BLOCK + "mlp.fc2.weight"),
    # transformers 5.x in-memory names (torch.save(model.state_dict()))
    ("model.pixel_level_module.encoder.swin.encoder.layers.1.blocks.0.attention.q_proj.weight",
     BLOCK + "attention.q_proj.weight"),
    ("model.pixel_level_module.encoder.swin.encoder.layers.1.blocks.0.attention.relative_position_bias."
     "relative_position_bias_table", BLOCK + "attention.relative_position_bias_table"),
    ("model.pixel_level_module.encoder.swin.embeddings.norm.weight", "model.pixel_level_module.encoder.embeddings.norm.weight"),
    # names shared with transformers pass through unchanged
    ("model.transformer_module.decoder.layers.0.fc1.weight", "model.transformer_module.decoder.layers.0.fc1.weight"),
    ("model.pixel_level_module.decoder.encoder.layers.0.fc2.bias",
     "model.pixel_level_module.decoder.encoder.layers.0.fc2.bias"),
    ("criterion.empty_weight", "criterion.empty_weight"),
])
def test_name_table_maps_transformers_keys_to_ours(transformers_key, our_key):
    assert to_our_key(transformers_key) == our_key


@pytest.mark.parametrize("key, ignored", [
    (BLOCK + "attention.self.relative_position_index", True),
    (BLOCK + "attention.relative_position_bias.relative_position_index", True),
    ("model.pixel_level_module.encoder.swin.layernorm.weight", True),
    ("model.pixel_level_module.encoder.hidden_states_norms.stage1.weight", False),
    ("model.pixel_level_module.decoder.encoder.layers.0.final_layer_norm.weight", False),
])
def test_only_constant_or_unused_keys_are_ignored(key, ignored):
    assert _is_ignored(key) is ignored, IGNORED_CHECKPOINT_KEYS


def test_every_key_transformers_saves_or_holds_maps_onto_our_state_dict(model_config_kwargs,
                                                                         model_reference_checkpoint):
    directory, reference = model_reference_checkpoint(model_config_kwargs(feature_size=64))
    ours = set(Mask2FormerForUniversalSegmentation(m2f_model.Mask2FormerConfig.from_pretrained(directory))
               .state_dict())

    on_disk = {to_our_key(k) for k in load_file(str(directory / SAFETENSORS_NAME)) if not _is_ignored(k)}
    in_memory = {to_our_key(k) for k in reference.state_dict() if not _is_ignored(k)}

    assert on_disk == ours
    assert in_memory == ours


def test_saving_inverts_the_table_to_transformers_on_disk_names(model_config_kwargs, model_reference_checkpoint):
    directory, _ = model_reference_checkpoint(model_config_kwargs())
    transformers_keys = set(load_file(str(directory / SAFETENSORS_NAME)))
    ours = Mask2FormerForUniversalSegmentation.from_pretrained(directory)

    assert {to_transformers_key(k) for k in ours.state_dict()} | {
        k for k in transformers_keys if _is_ignored(k)} == transformers_keys


def test_state_dict_holds_criterion_buffer_but_not_the_relative_position_index(model_config_kwargs):
    state_dict = Mask2FormerForUniversalSegmentation(m2f_model.Mask2FormerConfig(**model_config_kwargs())).state_dict()

    assert state_dict["criterion.empty_weight"].shape == (6,)
    assert not any("relative_position_index" in k for k in state_dict)


def _outputs(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values).masks_queries_logits


def test_hub_style_checkpoint_with_relative_position_index_loads(model_config_kwargs, model_reference_checkpoint):
    directory, reference = model_reference_checkpoint(model_config_kwargs())
    path = directory / SAFETENSORS_NAME
    tensors = load_file(str(path))
    from m2f_model.swin import relative_position_index
    tensors[BLOCK + "attention.self.relative_position_index"] = relative_position_index(4)
    save_file(tensors, str(path))
    pixel_values = torch.randn(1, 3, 64, 64)

    ours = Mask2FormerForUniversalSegmentation.from_pretrained(directory)

    assert torch.allclose(_outputs(ours, pixel_values), _outputs(reference, pixel_values), atol=1e-4)


def test_relative_position_index_of_another_window_is_an_error(model_config_kwargs, model_reference_checkpoint):
    directory, _ = model_reference_checkpoint(model_config_kwargs())
    path = directory / SAFETENSORS_NAME
    tensors = load_file(str(path))
    tensors[BLOCK + "attention.self.relative_position_index"] = torch.zeros(16, 16, dtype=torch.int64)
    save_file(tensors, str(path))

    with pytest.raises(CheckpointError, match="relative_position_index"):
        Mask2FormerForUniversalSegmentation.from_pretrained(directory)


def test_pytorch_model_bin_with_in_memory_names_loads(tmp_path, model_config_kwargs, model_reference_checkpoint):
    directory, reference = model_reference_checkpoint(model_config_kwargs())
    bin_directory = tmp_path / "bin"
    bin_directory.mkdir()
    shutil.copy(directory / "config.json", bin_directory / "config.json")
    torch.save(reference.state_dict(), bin_directory / "pytorch_model.bin")
    pixel_values = torch.randn(1, 3, 72, 56)

    ours = Mask2FormerForUniversalSegmentation.from_pretrained(bin_directory)

    assert torch.allclose(_outputs(ours, pixel_values), _outputs(reference, pixel_values), atol=1e-4)


def test_base_model_loads_from_a_universal_segmentation_checkpoint(model_config_kwargs, model_reference_checkpoint):
    directory, reference = model_reference_checkpoint(model_config_kwargs())
    pixel_values = torch.randn(1, 3, 64, 64)

    base = Mask2FormerModel.from_pretrained(directory)

    with torch.no_grad():
        expected = reference.model(pixel_values).masks_queries_logits[-1]
        actual = base(pixel_values).masks_queries_logits[-1]
    assert torch.allclose(actual, expected, atol=1e-4)


def _rewrite(directory, edit) -> None:
    path = directory / SAFETENSORS_NAME
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_weight_is_an_error_naming_the_weight_and_the_file(model_config_kwargs, model_reference_checkpoint):
    directory, _ = model_reference_checkpoint(model_config_kwargs())
    _rewrite(directory, lambda t: t.pop("class_predictor.weight"))

    with pytest.raises(CheckpointError, match=r"missing.*class_predictor\.weight") as error:
        Mask2FormerForUniversalSegmentation.from_pretrained(directory)
    assert str(directory / SAFETENSORS_NAME) in str(error.value)


def test_unexpected_weight_is_an_error_naming_it(model_config_kwargs, model_reference_checkpoint):
    directory, _ = model_reference_checkpoint(model_config_kwargs())
    _rewrite(directory, lambda t: t.update({"model.extra_head.weight": torch.zeros(3)}))

    with pytest.raises(CheckpointError, match=r"unexpected.*model\.extra_head\.weight"):
        Mask2FormerForUniversalSegmentation.from_pretrained(directory)


def test_mis_shaped_weight_is_an_error_naming_both_shapes(model_config_kwargs, model_reference_checkpoint):
    directory, _ = model_reference_checkpoint(model_config_kwargs())
    config = json.loads((directory / "config.json").read_text())
    config["num_queries"] = 9
    (directory / "config.json").write_text(json.dumps(config))

    with pytest.raises(CheckpointError, match=r"queries_embedder\.weight: checkpoint \(8, 32\) vs model \(9, 32\)"):
        Mask2FormerForUniversalSegmentation.from_pretrained(directory)


def test_non_strict_loading_lists_the_problems_and_loads_the_rest(model_config_kwargs, model_reference_checkpoint,
                                                                  caplog):
    directory, reference = model_reference_checkpoint(model_config_kwargs())
    _rewrite(directory, lambda t: (t.pop("class_predictor.bias"), t.update({"stray.weight": torch.zeros(1)})))

    with caplog.at_level(logging.WARNING, logger="m2f_model.checkpoints"):
        ours = Mask2FormerForUniversalSegmentation.from_pretrained(directory, strict=False)

    assert "class_predictor.bias" in caplog.text and "stray.weight" in caplog.text
    assert torch.equal(ours.class_predictor.weight, reference.class_predictor.weight)


def test_corrupt_safetensors_is_an_error_naming_the_file(model_config_kwargs, model_reference_checkpoint):
    directory, _ = model_reference_checkpoint(model_config_kwargs())
    (directory / SAFETENSORS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")

    with pytest.raises(CheckpointError, match=SAFETENSORS_NAME):
        Mask2FormerForUniversalSegmentation.from_pretrained(directory)


def test_truncated_safetensors_is_an_error_naming_the_file(model_config_kwargs, model_reference_checkpoint):
    directory, _ = model_reference_checkpoint(model_config_kwargs())
    path = directory / SAFETENSORS_NAME
    path.write_bytes(path.read_bytes()[:1000])

    with pytest.raises(CheckpointError, match=str(path)):
        Mask2FormerForUniversalSegmentation.from_pretrained(directory)


def test_missing_directory_config_or_weights_name_the_path(tmp_path, model_config_kwargs):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path)
    m2f_model.Mask2FormerConfig(**model_config_kwargs()).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors or pytorch_model.bin"):
        Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path)


def test_dtype_and_device_arguments_are_applied_after_loading(model_config_kwargs, model_reference_checkpoint):
    directory, _ = model_reference_checkpoint(model_config_kwargs())

    model = Mask2FormerForUniversalSegmentation.from_pretrained(directory, torch_dtype=torch.bfloat16, device="cpu")

    assert model.dtype == torch.bfloat16 and model.device.type == "cpu" and not model.training


def test_save_then_load_reproduces_the_model_exactly(tmp_path, model_config_kwargs):
    torch.manual_seed(1)
    model = Mask2FormerForUniversalSegmentation(m2f_model.Mask2FormerConfig(**model_config_kwargs())).eval()
    model.save_pretrained(tmp_path)

    loaded = Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path)

    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
