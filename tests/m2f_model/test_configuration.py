"""Mask2FormerConfig / SwinConfig: transformers' fields and defaults, config.json in both directions."""
from __future__ import annotations

import json

import pytest
import transformers

from m2f_model import Mask2FormerConfig, SwinConfig

# transformers bookkeeping that is not a hyper-parameter
_BOOKKEEPING = {"_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "is_encoder_decoder",
                "problem_type", "transformers_version", "id2label", "label2id", "backbone_config"}


def test_default_mask2former_fields_equal_transformers_defaults():
    reference = transformers.Mask2FormerConfig().to_dict()
    ours = Mask2FormerConfig().to_dict()

    for key in set(reference) - _BOOKKEEPING:
        assert key in ours, f"field {key} missing"
        assert ours[key] == reference[key] or list(ours[key]) == list(reference[key]), key
    assert ours["id2label"] == {0: "LABEL_0", 1: "LABEL_1"}


def test_default_backbone_is_transformers_default_swin():
    reference = transformers.Mask2FormerConfig().backbone_config.to_dict()
    ours = Mask2FormerConfig().backbone_config.to_dict()

    for key in set(reference) - _BOOKKEEPING:
        value = reference[key]
        assert ours[key] == value or (isinstance(value, (list, tuple)) and list(ours[key]) == list(value)), key


@pytest.mark.parametrize("kwargs", [{}, {"out_indices": [2, 4]}, {"out_features": ["stem", "stage3"]},
                                    {"depths": [2, 2, 2], "num_heads": [1, 2, 4]}])
def test_swin_out_features_and_indices_align_like_transformers(kwargs):
    reference = transformers.SwinConfig(**kwargs)
    ours = SwinConfig(**kwargs)

    assert ours.out_features == list(reference.out_features)
    assert ours.out_indices == list(reference.out_indices)
    assert ours.stage_names == list(reference.stage_names)
    assert ours.hidden_size == reference.hidden_size


def test_swin_rejects_out_features_that_are_not_stages():
    with pytest.raises(ValueError, match="stage9"):
        SwinConfig(out_features=["stage9"])


def test_config_json_written_by_transformers_loads_with_same_values(tmp_path, model_config_kwargs):
    transformers.Mask2FormerConfig(**model_config_kwargs(pre_norm=True)).save_pretrained(tmp_path)

    ours = Mask2FormerConfig.from_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())

    assert ours.pre_norm is True and ours.hidden_dim == 32 and ours.num_labels == 5
    assert ours.id2label == {0: "circle", 1: "square", 2: "triangle", 3: "sky", 4: "ground"}
    assert ours.label2id["sky"] == 3
    assert isinstance(ours.backbone_config, SwinConfig)
    assert ours.backbone_config.depths == written["backbone_config"]["depths"]
    assert ours.backbone_config.window_size == 4
    assert ours.transformers_version == written["transformers_version"]  # unknown keys are kept


def test_config_json_we_write_loads_in_transformers_with_same_values(tmp_path, model_config_kwargs):
    ours = Mask2FormerConfig(**model_config_kwargs({"window_size": 7}, num_queries=13, feature_strides=[4, 8, 16, 32]))
    ours.save_pretrained(tmp_path)

    reference = transformers.Mask2FormerConfig.from_pretrained(tmp_path)

    assert reference.num_queries == 13
    assert reference.id2label == ours.id2label
    assert reference.backbone_config.window_size == 7
    assert list(reference.backbone_config.out_features) == ["stage1", "stage2", "stage3", "stage4"]
    assert reference.backbone_config.model_type == "swin"


def test_id2label_keys_are_ints_in_memory_and_strings_in_json():
    config = Mask2FormerConfig(id2label={"0": "cat", "1": "dog"})

    assert config.id2label == {0: "cat", 1: "dog"}
    assert config.num_labels == 2
    assert json.loads(config.to_json_string())["id2label"] == {"0": "cat", "1": "dog"}


def test_num_labels_overrides_an_id2label_of_another_length_like_transformers():
    reference = transformers.Mask2FormerConfig(num_labels=3, id2label={0: "a", 1: "b"})
    ours = Mask2FormerConfig(num_labels=3, id2label={0: "a", 1: "b"})

    assert ours.id2label == reference.id2label


def test_setting_num_labels_regenerates_label_names():
    config = Mask2FormerConfig()
    config.num_labels = 4

    assert config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2", 3: "LABEL_3"}
    assert config.label2id["LABEL_3"] == 3


def test_hidden_size_and_num_hidden_layers_are_aliases():
    config = Mask2FormerConfig(hidden_size=64)
    config.num_hidden_layers = 4

    assert config.hidden_dim == 64 and config.hidden_size == 64
    assert config.decoder_layers == 4


def test_unknown_keys_survive_a_json_round_trip(tmp_path):
    Mask2FormerConfig(some_future_option={"a": 1}).save_pretrained(tmp_path)

    assert Mask2FormerConfig.from_pretrained(tmp_path).some_future_option == {"a": 1}


def test_from_backbone_config_accepts_swin_config_and_dict():
    swin = SwinConfig(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      out_features=["stage1", "stage2", "stage3", "stage4"])

    from_object = Mask2FormerConfig.from_backbone_config(swin, num_queries=7)
    from_dict = Mask2FormerConfig.from_backbone_config({"model_type": "swin", **swin.to_dict()}, num_queries=7)

    assert from_object.backbone_config.embed_dim == 32 and from_object.num_queries == 7
    assert from_dict.to_dict() == from_object.to_dict()


def test_non_swin_backbone_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="resnet"):
        Mask2FormerConfig(backbone_config={"model_type": "resnet"})


def test_missing_directory_or_config_json_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Mask2FormerConfig.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Mask2FormerConfig.from_pretrained(tmp_path)


def test_config_json_of_another_model_type_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "detr"}))

    with pytest.raises(ValueError, match="detr"):
        Mask2FormerConfig.from_pretrained(tmp_path)


def test_to_dict_round_trips_through_the_constructor():
    config = Mask2FormerConfig(num_queries=20, id2label={0: "a"})

    assert Mask2FormerConfig(**config.to_dict()) == config


def test_a_transformers_swin_config_object_is_accepted_as_backbone_config():
    reference_swin = transformers.SwinConfig(embed_dim=32, window_size=5, out_features=["stage1", "stage2",
                                                                                        "stage3", "stage4"])

    config = Mask2FormerConfig(backbone_config=reference_swin)

    assert isinstance(config.backbone_config, SwinConfig)
    assert config.backbone_config.window_size == 5 and config.backbone_config.out_indices == [1, 2, 3, 4]
