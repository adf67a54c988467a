"""Storage options: AWS variables and --storage-options merged once on the driver, secrets masked in reports."""
from __future__ import annotations

import pickle

import pytest

from pipeline.storage import StorageConfig, join_uri, protocol_of

AWS = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s3cret", "AWS_SESSION_TOKEN": "tok",
       "AWS_ENDPOINT_URL": "http://127.0.0.1:5000", "AWS_REGION": "eu-west-1"}


def test_aws_environment_becomes_s3fs_options():
    config = StorageConfig.resolve(None, environ=AWS)
    assert config.fsspec_options("s3") == {"key": "AKIA", "secret": "s3cret", "token": "tok",
                                           "endpoint_url": "http://127.0.0.1:5000",
                                           "client_kwargs": {"region_name": "eu-west-1"}}
    assert config.fsspec_options("file") == {}


def test_explicit_options_win_over_the_environment_and_s3_specific_endpoint_wins():
    config = StorageConfig.resolve('{"endpoint_url": "http://other:9000", "client_kwargs": {"verify": false}}',
                                   environ={**AWS, "AWS_ENDPOINT_URL_S3": "http://s3-only:1"})
    options = config.fsspec_options("s3")
    assert options["endpoint_url"] == "http://other:9000" and options["key"] == "AKIA"
    assert options["client_kwargs"] == {"region_name": "eu-west-1", "verify": False}
    assert StorageConfig.resolve(None, environ={**AWS, "AWS_ENDPOINT_URL_S3": "http://s3-only:1"}) \
        .fsspec_options("s3")["endpoint_url"] == "http://s3-only:1"


def test_config_travels_to_workers_by_pickle_with_its_settings():
    config = StorageConfig.resolve({"anon": False}, environ=AWS)
    assert pickle.loads(pickle.dumps(config)).fsspec_options("s3") == config.fsspec_options("s3")


def test_report_shows_options_with_secrets_masked():
    config = StorageConfig.resolve({"key": "AKIA", "secret": "s3cret", "endpoint_url": "http://x"}, environ={})
    assert config.redacted() == {"key": "***", "secret": "***", "endpoint_url": "http://x"}


def test_invalid_json_names_the_flag_and_an_example():
    with pytest.raises(ValueError, match="--storage-options is not valid JSON.*endpoint_url"):
        StorageConfig.resolve("{endpoint_url: x}", environ={})


def test_local_paths_and_uris_read_bytes_alike(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    config = StorageConfig.resolve(None, environ={})
    assert config.read_bytes(str(tmp_path / "a.bin")) == config.read_bytes(f"file://{tmp_path}/a.bin") == b"abc"
    assert protocol_of("s3://b/k") == "s3" and protocol_of("/x") == "file"
    assert join_uri("s3://b/prefix/", "images", "x.parquet") == "s3://b/prefix/images/x.parquet"


def test_the_older_client_kwargs_endpoint_form_means_the_same_as_endpoint_url():
    legacy = StorageConfig.resolve({"client_kwargs": {"endpoint_url": "http://127.0.0.1:5000", "verify": False}},
                                   environ={})
    assert legacy.fsspec_options("s3") == {"endpoint_url": "http://127.0.0.1:5000", "client_kwargs": {"verify": False}}
    assert StorageConfig.resolve({"client_kwargs": {"endpoint_url": "http://a"}}, environ={}) \
        .fsspec_options("s3") == StorageConfig.resolve({"endpoint_url": "http://a"}, environ={}).fsspec_options("s3")
    # The explicit endpoint also wins over the environment's in the older form.
    assert StorageConfig.resolve({"client_kwargs": {"endpoint_url": "http://a"}}, environ=AWS) \
        .fsspec_options("s3")["endpoint_url"] == "http://a"


def test_a_config_that_travelled_as_a_dict_comes_back_equal():
    from dataclasses import asdict

    config = StorageConfig.resolve({"endpoint_url": "http://a"}, environ=AWS)
    assert StorageConfig.coerce(asdict(config)) == config
    assert StorageConfig.coerce(config) is config


def test_training_dataset_locations_read_through_the_same_storage_layer(tmp_path):
    import pickle

    from training.storage import open_location

    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "x.json").write_text('{"a": 1}')
    config = StorageConfig.resolve({"endpoint_url": "http://a"}, environ=AWS)
    location = pickle.loads(pickle.dumps(open_location(str(tmp_path), config)))
    assert location.storage == config
    assert location.read_json(location.path("annotations", "x.json")) == {"a": 1}
