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


def test_text_manifest_of_many_entries_with_crlf_and_relative_dots_resolves_like_the_filesystem(tmp_path):
    entries = [f"shard{i % 7}/img{i:05d}.jpg" for i in range(20000)] + ["./x/../y.png\r", "/abs//z.png", "shard0/img00000.jpg"]
    manifest = tmp_path / "m.txt"
    manifest.write_text("\r\n".join(entries) + "\r\n")
    table = list_inputs(str(manifest), STORAGE)
    expected = [os.path.abspath(os.path.join(tmp_path, e.strip())) for e in entries[:-1]]
    assert table["image_uri"].to_pylist() == expected, "order kept, paths normalised, the duplicate dropped"


def test_s3_folder_listing_pages_every_sub_prefix_and_matches_a_plain_find(s3_storage, monkeypatch):
    monkeypatch.setattr("pipeline.listing._S3_KEYS_PER_PAGE", 7)
    filesystem, _ = s3_storage.filesystem("s3://listing")
    filesystem.mkdir("listing")
    keys = ([f"photos/top{i}.png" for i in range(3)] + [f"photos/a/{i:04d}.jpg" for i in range(40)]
            + ["photos/b/c/deep.webp", "photos/b/.hidden.png", "photos/b/notes.txt", "photos/bb.JPG",
               "elsewhere/x.png"])
    filesystem.pipe({f"listing/{key}": b"x" for key in keys})
    table = list_inputs("s3://listing/photos", s3_storage)
    expected = sorted(k for k in keys if k.startswith("photos/") and k.lower().endswith((".png", ".jpg", ".webp"))
                      and not k.rsplit("/", 1)[-1].startswith("."))
    assert table["image_uri"].to_pylist() == [f"s3://listing/{key}" for key in expected]
    assert table["image_id"].to_pylist()[:3] == ["a/0000.jpg", "a/0001.jpg", "a/0002.jpg"]
    assert len(expected) == 40 + 3 + 2  # several ListObjects pages under photos/a


def test_s3_manifest_entries_resolve_beside_the_manifest(s3_storage):
    filesystem, _ = s3_storage.filesystem("s3://manifests")
    filesystem.mkdir("manifests")
    filesystem.pipe("manifests/runs/list.csv", b"uri,image_id\nrel/a.png,\n/other/b.png,bee\ns3://x/c.png,see\n")
    table = list_inputs("s3://manifests/runs/list.csv", s3_storage)
    assert table.to_pylist() == [
        {"image_uri": "s3://manifests/runs/rel/a.png", "image_id": "s3://manifests/runs/rel/a.png"},
        {"image_uri": "s3://other/b.png", "image_id": "bee"},
        {"image_uri": "s3://x/c.png", "image_id": "see"}]


def test_non_ascii_folder_and_file_names_give_exact_relative_ids(tmp_path):
    root = tmp_path / "fotos-été"
    for relative in ["ça/über.png", "日本/猫.jpg"]:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"x")
    table = list_inputs(str(root), STORAGE)
    assert table["image_id"].to_pylist() == ["ça/über.png", "日本/猫.jpg"]
    assert table["image_uri"].to_pylist() == [str(root / "ça/über.png"), str(root / "日本/猫.jpg")]
