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
    top-level sub-prefix, up to _LISTING_THREADS of them at once on s3fs's event loop."""
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
        slots = asyncio.Semaphore(_LISTING_THREADS)

        async def recursive_keys(sub_prefix: str) -> tuple[list[pa.Array], list[str]]:
            async with slots:
                return await keys_under(sub_prefix, "")

        results = await asyncio.gather(*(recursive_keys(p) for p in sub_prefixes))
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
    entries = _trimmed(table.column(uri_column).cast(pa.string()))
    present = pc.fill_null(pc.greater(pc.utf8_length(entries), 0), False)
    if not pc.all(present).as_py():
        entries = pc.filter(entries, present)
    uris = _resolve_manifest_entries(entries, posixpath.dirname(path), input_uri)
    if "image_id" in table.column_names and uri_column != "image_id":
        ids = _trimmed(pc.filter(table.column("image_id").cast(pa.string()), present))
        image_ids = pc.if_else(pc.fill_null(pc.greater(pc.utf8_length(ids), 0), False), ids, uris)
    else:
        image_ids = uris
    return pa.table({"image_uri": uris, "image_id": image_ids}, schema=LISTED_SCHEMA)


def _trimmed(strings: pa.ChunkedArray) -> pa.ChunkedArray:
    """Without surrounding whitespace; no copy when there is none (the usual case at 10M entries)."""
    if pc.any(pc.match_substring_regex(strings, r"^\s|\s$")).as_py():
        return pc.utf8_trim_whitespace(strings)
    return strings


def _text_lines(raw: bytes) -> pa.Array:
    """The lines of a UTF-8 text, split by Arrow (one string per line, no Python object per line)."""
    text = pa.array([raw], pa.large_binary()).cast(pa.large_string())
    return _trimmed(pc.split_pattern(text, "\n").flatten()).cast(pa.string())


def _manifest_uri_column(schema: pa.Schema, input_uri: str) -> str:
    for name in _URI_COLUMN_NAMES:
        if name in schema.names:
            return name
    string_columns = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if len(schema.names) == 1 and string_columns:
        return string_columns[0]
    raise ValueError(f"manifest {input_uri} has columns {schema.names}; name the column of image URIs "
                     f"one of {list(_URI_COLUMN_NAMES)}")


def _resolve_manifest_entries(entries: pa.ChunkedArray, manifest_dir: str, input_uri: str) -> pa.Array:
    """Entries with a scheme or an absolute local path stand as they are (file:// ones become local paths);
    relative ones sit beside the manifest. Local paths come out absolute and normalised. Only the entries that
    change are computed on (copies of a 10M-entry column add up)."""
    entries = entries.combine_chunks()
    local_input = is_local_uri(input_uri)
    has_scheme = pc.match_substring(entries, "://")
    changes = pc.or_(pc.starts_with(entries, "file://"), pc.invert(has_scheme)) if local_input \
        else pc.invert(has_scheme)
    if local_input:  # absolute local paths change only when abspath would change them
        changes = pc.and_(changes, pc.or_(pc.invert(pc.starts_with(entries, "/")),
                                          pc.match_substring_regex(entries, _NOT_NORMALISED)))
    if not pc.any(changes).as_py():
        return entries
    subset = pc.filter(entries, changes)
    beside_manifest = manifest_dir.rstrip("/") + "/"
    if local_input:
        subset = pc.if_else(pc.starts_with(subset, "file://"), pc.utf8_slice_codeunits(subset, len("file://")), subset)
        subset = pc.if_else(pc.starts_with(subset, "/"), subset,
                            pc.binary_join_element_wise(beside_manifest, subset, ""))
        resolved = _normalised_local_paths(subset)
    else:
        protocol = protocol_of(input_uri)
        resolved = pc.if_else(pc.starts_with(subset, "/"),
                              pc.binary_join_element_wise(f"{protocol}://", pc.utf8_ltrim(subset, "/"), ""),
                              pc.binary_join_element_wise(f"{protocol}://{beside_manifest}", subset, ""))
    return pc.replace_with_mask(entries, changes, resolved)


def _normalised_local_paths(paths: pa.Array) -> pa.Array:
    """os.path.abspath of each absolute path, run in Python only for the few paths it would change."""
    needs_python = pc.match_substring_regex(paths, _NOT_NORMALISED)
    if not pc.any(needs_python).as_py():
        return paths
    fixed = [os.path.abspath(path) for path in pc.filter(paths, needs_python).to_pylist()]
    return pc.replace_with_mask(paths, needs_python, pa.array(fixed, pa.string()))


def _drop_duplicates(table: pa.Table) -> pa.Table:
    """Keeps the first row of each image_uri, in the original order."""
    first_positions = _first_occurrences(table["image_uri"].combine_chunks())
    return table if first_positions is None else table.take(first_positions)


def _first_occurrences(values: pa.Array) -> pa.Array | None:
    """Positions of the first occurrence of each value, ascending; None when no value repeats.

    By a stable sort rather than a hash table: at 10M strings a hash table costs several times the strings'
    own size, the sort only an index per value."""
    order = pc.sort_indices(values)  # stable: equal values keep their original order
    ordered = pc.take(values, order)
    repeats_previous = pc.equal(ordered.slice(1), ordered.slice(0, max(len(ordered) - 1, 0)))
    if not pc.any(repeats_previous).as_py():
        return None
    is_first = pa.concat_arrays([pa.array([True]), pc.invert(repeats_previous)])
    first_positions = pc.filter(order, is_first)
    return pc.take(first_positions, pc.sort_indices(first_positions))
