"""Resume bookkeeping: which inputs are done, and compaction so every input appears exactly once.

An input is done when its latest images row says 'ok'. Rows are ordered by run_id (sortable: a UTC
timestamp first), then 'ok' over 'error', then file stem; the last one wins. A re-run writes fresh rows for
the images that failed before, so older rows get superseded; `compact` removes superseded rows from disk,
rewriting a batch's two files without them (new files first, old ones deleted after, images before
segments), so a crash at any point leaves either the old state or duplicates that the next compaction
resolves the same way, never a lost row.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.records import IMAGES_SCHEMA
from pipeline.sinks import (IMAGES_DIR, SEGMENTS_DIR, list_stems, read_table_file, remove_partial_files,
                            remove_table_file, write_table_file)
from pipeline.storage import StorageConfig

__all__ = ["CompactionResult", "load_image_rows", "winning_rows", "compact", "done_image_uris"]


@dataclass
class CompactionResult:
    images: pa.Table  # the winning images rows, one per input ever recorded under this output
    stems: dict[str, str] = field(default_factory=dict)  # image_uri -> stem of the files holding its rows
    removed_partial_files: list[str] = field(default_factory=list)
    rewritten_stems: list[str] = field(default_factory=list)
    removed_stems: list[str] = field(default_factory=list)


def load_image_rows(output_uri: str, storage: StorageConfig) -> pa.Table:
    """Every committed images row, with a `_stem` column naming the file it came from."""
    tables = []
    for stem in list_stems(output_uri, storage, IMAGES_DIR):
        table = read_table_file(output_uri, storage, IMAGES_DIR, stem).cast(IMAGES_SCHEMA)
        tables.append(table.append_column("_stem", pa.array([stem] * table.num_rows, pa.string())))
    if not tables:
        return IMAGES_SCHEMA.empty_table().append_column("_stem", pa.array([], pa.string()))
    return pa.concat_tables(tables)


def winning_rows(rows: pa.Table) -> pa.Table:
    """The latest row per image_uri (run_id, then ok over error, then stem)."""
    if rows.num_rows == 0:
        return rows
    order = pc.sort_indices(
        rows.append_column("_ok", pc.equal(rows["status"], "ok")),
        sort_keys=[("image_uri", "ascending"), ("run_id", "ascending"), ("_ok", "ascending"),
                   ("_stem", "ascending")])
    ordered = rows.take(order)
    uris = ordered["image_uri"].to_pylist()
    last_of_each = [i for i in range(len(uris)) if i + 1 == len(uris) or uris[i + 1] != uris[i]]
    return ordered.take(pa.array(last_of_each, pa.int64()))


def done_image_uris(winners: pa.Table) -> set[str]:
    return set(winners.filter(pc.equal(winners["status"], "ok"))["image_uri"].to_pylist())


def compact(output_uri: str, storage: StorageConfig) -> CompactionResult:
    """Removes partial files and superseded rows; afterwards each recorded input has exactly one images row and
    its segments exist only beside it."""
    result = CompactionResult(images=IMAGES_SCHEMA.empty_table())
    result.removed_partial_files = remove_partial_files(output_uri, storage)
    rows = load_image_rows(output_uri, storage)
    winners = winning_rows(rows)
    winner_keys = set(zip(winners["image_uri"].to_pylist(), winners["_stem"].to_pylist()))
    stems = rows["_stem"].to_pylist()
    uris = rows["image_uri"].to_pylist()
    kept_by_stem: dict[str, set[str]] = {}
    total_by_stem: dict[str, int] = {}
    for uri, stem in zip(uris, stems):
        total_by_stem[stem] = total_by_stem.get(stem, 0) + 1
        if (uri, stem) in winner_keys:
            kept_by_stem.setdefault(stem, set()).add(uri)
    for stem, total in total_by_stem.items():
        kept = kept_by_stem.get(stem, set())
        if len(kept) == total:
            continue
        if kept:
            _rewrite_batch(output_uri, storage, stem, kept)
            result.rewritten_stems.append(stem)
        else:
            remove_table_file(output_uri, storage, IMAGES_DIR, stem)
            remove_table_file(output_uri, storage, SEGMENTS_DIR, stem)
            result.removed_stems.append(stem)
    rewritten = {stem: f"{stem}-k{_kept_digest(kept_by_stem[stem])}" for stem in result.rewritten_stems}
    result.stems = {uri: rewritten.get(stem, stem)
                    for uri, stem in zip(winners["image_uri"].to_pylist(), winners["_stem"].to_pylist())}
    result.images = winners.drop_columns(["_stem"])
    return result


def _kept_digest(kept_uris: set[str]) -> str:
    return hashlib.sha1("\n".join(sorted(kept_uris)).encode()).hexdigest()[:8]


def _rewrite_batch(output_uri: str, storage: StorageConfig, stem: str, kept_uris: set[str]) -> None:
    keep = pa.array(sorted(kept_uris), pa.string())
    new_stem = f"{stem}-k{_kept_digest(kept_uris)}"  # sorts after `stem`, so it wins the tie if both survive a crash
    images = read_table_file(output_uri, storage, IMAGES_DIR, stem)
    segments = read_table_file(output_uri, storage, SEGMENTS_DIR, stem)
    write_table_file(output_uri, storage, SEGMENTS_DIR, new_stem, segments.filter(pc.is_in(segments["image_uri"], keep)))
    write_table_file(output_uri, storage, IMAGES_DIR, new_stem, images.filter(pc.is_in(images["image_uri"], keep)))
    remove_table_file(output_uri, storage, IMAGES_DIR, stem)
    remove_table_file(output_uri, storage, SEGMENTS_DIR, stem)
