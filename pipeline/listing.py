"""Input URI -> the ordered list of image objects to label.

An input is a folder (local path, `file://`, `s3://bucket/prefix`, any fsspec URI), a single image, or a
manifest: a Parquet, CSV or text file listing the objects, which is how millions of objects are handed over
without listing a bucket. Folders are filtered by extension and sorted by path; manifests keep their own
order and every entry counts as an input (an entry that is not an image becomes an error row, not a silent
skip). Duplicates are dropped, keeping the first.

Built for buckets and manifests of 10M entries: everything stays in Arrow arrays (string kernels resolve,
filter, sort and de-duplicate), so the driver never holds a Python object per entry. S3 folders are listed
page by page (1000 keys a request, each page turned into Arrow at once) and one listing per top-level prefix
runs concurrently; other filesystems are walked a directory at a time, top-level directories in parallel.
"""
from __future__ import annotations

import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.records import LISTED_SCHEMA
from pipeline.storage import StorageConfig, is_local_uri, protocol_of

__all__ = ["IMAGE_EXTENSIONS", "MANIFEST_EXTENSIONS", "list_inputs"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MANIFEST_EXTENSIONS: tuple[str, ...] = (".parquet", ".csv", ".txt")
_URI_COLUMN_NAMES = ("image_uri", "uri", "url", "path")
_S3_PROTOCOLS = ("s3", "s3a")
_LISTING_THREADS = 16
_S3_KEYS_PER_PAGE = 1000  # S3's maximum
# A local path that os.path.abspath would change: '.' or '..' segments, doubled or trailing slashes.
_NOT_NORMALISED = r"(^|/)\.\.?(/|$)|//|./$"


def list_inputs(input_uri: str, storage: StorageConfig, *, extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
                limit: int | None = None) -> pa.Table:
    """The inputs behind `input_uri` as a table (image_uri, image_id) in a stable order.

    image_uri is canonical (absolute local path, or `protocol://path`); image_id is the path relative to the
    input folder, or the manifest's `image_id` column, or the image_uri itself.
    """
    filesystem, path = storage.filesystem(input_uri)
    if not filesystem.exists(path):
        raise FileNotFoundError(f"--input {input_uri} does not exist; give a folder, an image or a manifest "
                                f"({', '.join(MANIFEST_EXTENSIONS)})")
    wanted = tuple(e.lower() for e in extensions)
    if filesystem.isdir(path):
        table = _list_folder(filesystem, path, input_uri, wanted)
    elif path.lower().endswith(MANIFEST_EXTENSIONS):
        table = _read_manifest(filesystem, path, input_uri)
    elif path.lower().endswith(wanted):
        table = pa.table({"image_uri": [_canonical_uri(input_uri, path)], "image_id": [posixpath.basename(path)]},
                         schema=LISTED_SCHEMA)
    else:
        raise ValueError(f"--input {input_uri} is a file but neither an image ({', '.join(wanted)}) nor a "
                         f"manifest ({', '.join(MANIFEST_EXTENSIONS)})")
    table = _drop_duplicates(table)
    return table.slice(0, limit) if limit is not None else table


def _canonical_uri(input_uri: str, path: str) -> str:
    if is_local_uri(input_uri):
        return os.path.abspath(path)
    return f"{protocol_of(input_uri)}://{path}"


# ----------------------------------------------------------------------------------------------
# Folders


def _list_folder(filesystem, path: str, input_uri: str, extensions: tuple[str, ...]) -> pa.Table:
    root = path.rstrip("/")
    if protocol_of(input_uri) in _S3_PROTOCOLS:
        paths = _list_s3_prefix(filesystem, root)
    else:
        paths = _walk_in_parallel(filesystem, root)
    extension_pattern = "(?i)(" + "|".join(re.escape(e) for e in extensions) + ")$"
    keep = pc.and_(pc.match_substring_regex(paths, extension_pattern),
                   pc.invert(pc.match_substring_regex(paths, r"(^|/)\.[^/]*$")))  # hidden files
    paths = pc.filter(paths, keep)
    paths = pc.take(paths, pc.sort_indices(paths))
    if is_local_uri(input_uri):
        uris = paths
    else:
        uris = pc.binary_join_element_wise(f"{protocol_of(input_uri)}://", paths, "")
    image_ids = pc.utf8_slice_codeunits(paths, len(root) + 1)
    return pa.table({"image_uri": uris, "image_id": image_ids}, schema=LISTED_SCHEMA)


def _list_s3_prefix(filesystem, root: str) -> pa.ChunkedArray:
    """Every object key under `root` ('bucket/prefix'), as 'bucket/key' strings: one paginated listing per
    top-level sub-prefix, all running at once on s3fs's event loop."""
    import asyncio

    from fsspec.asyn import sync

    bucket, _, prefix = root.partition("/")
    prefix = f"{prefix}/" if prefix else ""

    async def keys_under(sub_prefix: str, delimiter: str) -> tuple[list[pa.Array], list[str]]:
        chunks, sub_prefixes = [], []
        async for page in _pages(filesystem, bucket, sub_prefix, delimiter):
            keys = [entry["Key"] for entry in page.get("Contents", [])]
            if keys:
                chunks.append(pa.array(keys, pa.string()))
            sub_prefixes.extend(entry["Prefix"] for entry in page.get("CommonPrefixes", []))
        return chunks, sub_prefixes

    async def list_all() -> list[pa.Array]:
        top_chunks, sub_prefixes = await keys_under(prefix, "/")
        results = await asyncio.gather(*(keys_under(p, "") for p in sub_prefixes))
        return top_chunks + [chunk for chunks, _ in results for chunk in chunks]

    chunks = sync(filesystem.loop, list_all)
    keys = pa.chunked_array(chunks, pa.string())
    return pc.binary_join_element_wise(f"{bucket}/", keys, "")


async def _pages(filesystem, bucket: str, prefix: str, delimiter: str):
    """Raw ListObjectsV2 pages from s3fs's client (its own `_find` builds a dict per object before returning)."""
    async for page in filesystem._list_pages("list_objects_v2", Bucket=bucket, Prefix=prefix, Delimiter=delimiter,
                                             MaxKeys=_S3_KEYS_PER_PAGE, **filesystem.req_kw):
        yield page


def _walk_in_parallel(filesystem, root: str) -> pa.ChunkedArray:
    """Paths of every file under `root`, a directory at a time; the top-level directories are walked in
    parallel. Hidden directories are walked too (only hidden files are skipped)."""
    top = filesystem.ls(root, detail=True)
    files = [entry["name"] for entry in top if entry["type"] != "directory"]
    directories = [entry["name"] for entry in top if entry["type"] == "directory"]

    def walk(directory: str) -> list[pa.Array]:
        return [pa.array([posixpath.join(folder, name) for name in names], pa.string())
                for folder, _, names in filesystem.walk(directory) if names]

    chunks = [pa.array(files, pa.string())]
    with ThreadPoolExecutor(max_workers=max(1, min(_LISTING_THREADS, len(directories)))) as pool:
        for walked in pool.map(walk, directories):
            chunks.extend(walked)
    return pa.chunked_array(chunks, pa.string())


# ----------------------------------------------------------------------------------------------
# Manifests


def _read_manifest(filesystem, path: str, input_uri: str) -> pa.Table:
    with filesystem.open(path, "rb") as handle:
        raw = handle.read()
    lowered = path.lower()
    if lowered.endswith(".txt"):
        lines = _text_lines(raw)
        table = pa.table({"image_uri": pc.filter(lines, pc.invert(pc.starts_with(lines, "#")))})
    elif lowered.endswith(".csv"):
        table = pa_csv.read_csv(pa.BufferReader(raw))
    else:
        parquet = pq.ParquetFile(pa.BufferReader(raw))
        names = parquet.schema_arrow.names
        uri_column = _manifest_uri_column(parquet.schema_arrow, input_uri)
        table = parquet.read(columns=[uri_column, *(["image_id"] if "image_id" in names else [])])
    uri_column = _manifest_uri_column(table.schema, input_uri)
    entries = pc.utf8_trim_whitespace(table.column(uri_column).cast(pa.string()))
    present = pc.fill_null(pc.greater(pc.utf8_length(entries), 0), False)
    entries = pc.filter(entries, present)
    uris = _resolve_manifest_entries(entries, posixpath.dirname(path), input_uri)
    if "image_id" in table.column_names and uri_column != "image_id":
        ids = pc.utf8_trim_whitespace(pc.filter(table.column("image_id").cast(pa.string()), present))
        image_ids = pc.if_else(pc.fill_null(pc.greater(pc.utf8_length(ids), 0), False), ids, uris)
    else:
        image_ids = uris
    return pa.table({"image_uri": uris, "image_id": image_ids}, schema=LISTED_SCHEMA)


def _text_lines(raw: bytes) -> pa.Array:
    """The lines of a UTF-8 text, split by Arrow (one string per line, no Python object per line)."""
    text = pa.array([raw], pa.large_binary()).cast(pa.large_string())
    lines = pc.split_pattern(text, "\n").flatten()
    return pc.utf8_trim_whitespace(lines).cast(pa.string())


def _manifest_uri_column(schema: pa.Schema, input_uri: str) -> str:
    for name in _URI_COLUMN_NAMES:
        if name in schema.names:
            return name
    string_columns = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if len(schema.names) == 1 and string_columns:
        return string_columns[0]
    raise ValueError(f"manifest {input_uri} has columns {schema.names}; name the column of image URIs "
                     f"one of {list(_URI_COLUMN_NAMES)}")


def _resolve_manifest_entries(entries: pa.ChunkedArray, manifest_dir: str, input_uri: str) -> pa.ChunkedArray:
    """Entries with a scheme or an absolute local path stand as they are (file:// ones become local paths);
    relative ones sit beside the manifest. Local paths come out absolute and normalised."""
    has_scheme = pc.match_substring(entries, "://")
    if is_local_uri(input_uri):
        is_file_uri = pc.starts_with(entries, "file://")
        local = pc.if_else(is_file_uri, pc.utf8_slice_codeunits(entries, len("file://")), entries)
        local = pc.if_else(pc.starts_with(local, "/"), local,
                           pc.binary_join_element_wise(manifest_dir.rstrip("/") + "/", local, ""))
        is_local = pc.or_(is_file_uri, pc.invert(has_scheme))
        return pc.if_else(is_local, _normalised_local_paths(local, is_local), entries)
    protocol = protocol_of(input_uri)
    absolute = pc.binary_join_element_wise(f"{protocol}://", pc.utf8_ltrim(entries, "/"), "")
    relative = pc.binary_join_element_wise(f"{protocol}://{manifest_dir.rstrip('/')}/" if manifest_dir
                                           else f"{protocol}://", entries, "")
    return pc.if_else(has_scheme, entries, pc.if_else(pc.starts_with(entries, "/"), absolute, relative))


def _normalised_local_paths(paths: pa.ChunkedArray, is_local: pa.ChunkedArray) -> pa.ChunkedArray:
    """os.path.abspath of each local path, run in Python only for the few paths it would change."""
    needs_python = pc.and_(is_local, pc.match_substring_regex(paths, _NOT_NORMALISED))
    positions = pc.indices_nonzero(needs_python)
    if len(positions) == 0:
        return paths
    fixed = pa.array([os.path.abspath(p) for p in pc.take(paths, positions).to_pylist()], pa.string())
    return pc.replace_with_mask(paths.combine_chunks(), needs_python.combine_chunks(), fixed)


def _drop_duplicates(table: pa.Table) -> pa.Table:
    """Keeps the first row of each image_uri, in the original order."""
    positions = table.append_column("_position", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    firsts = positions.group_by("image_uri").aggregate([("_position", "min")])["_position_min"]
    if len(firsts) == table.num_rows:
        return table
    return table.take(pc.take(firsts, pc.sort_indices(firsts)))
