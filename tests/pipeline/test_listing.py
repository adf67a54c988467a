"""Listing: folders, file:// URIs, manifests (Parquet/CSV/text), extension filter, stable order, duplicates."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.listing import list_inputs
from pipeline.storage import StorageConfig

STORAGE = StorageConfig.resolve({}, environ={})


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    for relative in ["b.png", "a.JPG", "sub/c.jpeg", "sub/deeper/d.webp", "notes.txt", "model.bin", ".hidden.png",
                     "sub/e.tiff"]:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return root


def test_folder_listing_is_recursive_sorted_and_keeps_only_image_extensions(folder):
    table = list_inputs(str(folder), STORAGE)
    assert table["image_id"].to_pylist() == ["a.JPG", "b.png", "sub/c.jpeg", "sub/deeper/d.webp", "sub/e.tiff"]
    assert table["image_uri"].to_pylist() == [str(folder / i) for i in table["image_id"].to_pylist()]


def test_file_uri_and_relative_path_list_the_same_canonical_uris(folder, monkeypatch):
    monkeypatch.chdir(folder.parent)
    by_uri = list_inputs(f"file://{folder}", STORAGE)
    by_relative_path = list_inputs("images", STORAGE)
    assert by_uri.equals(by_relative_path)
    assert all(os.path.isabs(uri) for uri in by_uri["image_uri"].to_pylist())


def test_extension_filter_is_configurable(folder):
    table = list_inputs(str(folder), STORAGE, extensions=(".png",))
    assert table["image_id"].to_pylist() == ["b.png"]


def test_limit_takes_the_first_inputs_in_listing_order(folder):
    assert list_inputs(str(folder), STORAGE, limit=2)["image_id"].to_pylist() == ["a.JPG", "b.png"]


def test_text_manifest_keeps_its_order_resolves_relative_entries_and_drops_duplicates(folder, tmp_path):
    manifest = folder / "list.txt"
    manifest.write_text(f"# comment\nsub/c.jpeg\n\n{folder / 'b.png'}\nfile://{folder / 'a.JPG'}\nsub/c.jpeg\n"
                        "s3://bucket/key/x.png\n")
    table = list_inputs(str(manifest), STORAGE)
    assert table["image_uri"].to_pylist() == [str(folder / "sub/c.jpeg"), str(folder / "b.png"),
                                              str(folder / "a.JPG"), "s3://bucket/key/x.png"]
    assert table["image_id"].to_pylist() == table["image_uri"].to_pylist()


def test_parquet_manifest_uses_its_image_id_column(tmp_path):
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"image_uri": ["s3://b/2.jpg", "s3://b/1.jpg"], "image_id": ["two", "one"],
                             "size": [1, 2]}), manifest)
    table = list_inputs(str(manifest), STORAGE)
    assert table["image_uri"].to_pylist() == ["s3://b/2.jpg", "s3://b/1.jpg"]
    assert table["image_id"].to_pylist() == ["two", "one"]


def test_csv_manifest_with_a_path_column(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\n/data/x.png,1\n/data/y.png,2\n")
    assert list_inputs(str(manifest), STORAGE)["image_uri"].to_pylist() == ["/data/x.png", "/data/y.png"]


def test_manifest_without_a_uri_column_names_the_columns_it_found(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"\['a', 'b'\].*image_uri"):
        list_inputs(str(manifest), STORAGE)


def test_missing_input_fails_with_its_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_inputs(str(tmp_path / "nowhere"), STORAGE)


def test_single_image_file_is_one_input(folder):
    table = list_inputs(str(folder / "b.png"), STORAGE)
    assert table.to_pylist() == [{"image_uri": str(folder / "b.png"), "image_id": "b.png"}]
