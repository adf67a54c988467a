"""Resume bookkeeping: which inputs are done, and compaction so every input appears exactly once.

An input is done when its latest images row says 'ok'. Rows are ordered by run_id (sortable: a UTC
timestamp first), then 'ok' over 'error', then file stem; the last one wins. A re-run writes fresh rows for
the images that failed before, so older rows get superseded; `compact` removes superseded rows from disk,
rewriting a batch's two files without them (new files first, old ones deleted after, images before
segments), so a crash at any point leaves either the old state or duplicates that the next compaction
resolves the same way, never a lost row. The common case, a batch whose superseded rows are all errors
(they have no segments), rewrites only that batch's images file, in place: the replacement is atomic.

At scale (millions of images, thousands of files) the work stays off the driver's Python loop: the images
files are read in parallel and only the columns the bookkeeping needs, winners are chosen with Arrow
kernels, and only images recorded more than once (rare: re-runs of failed inputs, retried batches, a crash
mid-compaction) are sorted and only the files holding their superseded rows are rewritten.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.records import IMAGES_SCHEMA, TASKS
from pipeline.sinks import (IMAGES_DIR, SEGMENTS_DIR, list_stems, read_table_file, read_table_files,
                            remove_partial_files, remove_table_file, write_table_file)
from pipeline.storage import StorageConfig

__all__ = ["BOOKKEEPING_COLUMNS", "FILE_INDEX_COLUMN", "CompactionResult", "load_image_rows", "winning_rows", "compact",
           "done_image_uris"]

# What resume, compaction and the report's totals read of each images row (image_id only for overlays).
BOOKKEEPING_COLUMNS: tuple[str, ...] = ("image_uri", "status", "run_id", *(f"{task}_segments" for task in TASKS))
FILE_INDEX_COLUMN = "_file"  # index into the sorted list of stems: ordering by it orders by stem
_FILE = FILE_INDEX_COLUMN
_REWRITE_THREADS = 8


@dataclass
class CompactionResult:
    images: pa.Table  # the winning images rows (the columns read), one per input ever recorded here
    file_index: pa.Array  # aligned with `images`: where in `file_stems` the files holding each row are named
    file_stems: list[str | None]  # stems of the committed batches after compaction (a removed batch keeps its slot)
    removed_partial_files: list[str] = field(default_factory=list)
    rewritten_stems: list[str] = field(default_factory=list)
    removed_stems: list[str] = field(default_factory=list)

    def stems_of(self, rows: pa.Array) -> list[str]:
        """The stems of the files holding `rows` (positions in `images`), e.g. to read their segments."""
        return [self.file_stems[i] for i in pc.take(self.file_index, rows).to_pylist()]


def load_image_rows(output_uri: str, storage: StorageConfig,
                    columns: tuple[str, ...] = BOOKKEEPING_COLUMNS) -> tuple[pa.Table, list[str]]:
    """Every committed images row (only `columns`) with a `_file` column, and the sorted stems it indexes."""
    schema = pa.schema([IMAGES_SCHEMA.field(name) for name in columns])
    stems = list_stems(output_uri, storage, IMAGES_DIR)
    tables = []
    for index, table in enumerate(read_table_files(output_uri, storage, IMAGES_DIR, stems, list(columns))):
        table = table.select(list(columns)).cast(schema)
        tables.append(table.append_column(_FILE, pa.array(np.full(table.num_rows, index, np.int32))))
    if not tables:
        return schema.append(pa.field(_FILE, pa.int32())).empty_table(), stems
    return pa.concat_tables(tables).combine_chunks(), stems


def _split_winners(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(the latest row per image_uri, the superseded rows). Only images recorded more than once are sorted
    by the whole key; finding them takes a sort of the URIs alone (a hash table of 10M strings would cost
    several times their size)."""
    contested_mask = _recorded_more_than_once(rows["image_uri"].combine_chunks())
    if contested_mask is None:
        return rows, rows.slice(0, 0)
    contested = rows.filter(contested_mask)
    order = pc.sort_indices(
        contested.append_column("_ok", pc.equal(contested["status"], "ok")),
        sort_keys=[("image_uri", "ascending"), ("run_id", "ascending"), ("_ok", "ascending"), (_FILE, "ascending")])
    ordered = contested.take(order)
    uris = ordered["image_uri"].combine_chunks()
    is_last = pa.concat_arrays([pc.not_equal(uris.slice(0, len(uris) - 1), uris.slice(1)), pa.array([True])])
    winners = pa.concat_tables([rows.filter(pc.invert(contested_mask)), ordered.filter(is_last)])
    return winners, ordered.filter(pc.invert(is_last))


def _recorded_more_than_once(uris: pa.Array) -> pa.Array | None:
    """A mask of the rows whose URI occurs more than once; None when every URI is unique."""
    order = pc.sort_indices(uris)
    ordered = pc.take(uris, order)
    same_as_next = pc.equal(ordered.slice(0, max(len(ordered) - 1, 0)), ordered.slice(1))
    if not pc.any(same_as_next).as_py():
        return None
    in_a_group = pc.or_(pa.concat_arrays([same_as_next, pa.array([False])]),
                        pa.concat_arrays([pa.array([False]), same_as_next]))  # in sorted order
    mask = np.zeros(len(uris), bool)
    mask[pc.filter(order, in_a_group).to_numpy()] = True
    return pa.array(mask)


def winning_rows(rows: pa.Table) -> pa.Table:
    """The latest row per image_uri (run_id, then ok over error, then file), in no particular order."""
    return _split_winners(rows)[0] if rows.num_rows else rows


def done_image_uris(winners: pa.Table) -> pa.Array:
    """The image_uris whose winning row is 'ok'."""
    return winners.filter(pc.equal(winners["status"], "ok"))["image_uri"].combine_chunks()


def compact(output_uri: str, storage: StorageConfig,
            columns: tuple[str, ...] = BOOKKEEPING_COLUMNS) -> CompactionResult:
    """Removes partial files and superseded rows; afterwards each recorded input has exactly one images row and
    its segments exist only beside it. Returns the winning rows (`columns` of them) and where they live."""
    if not {"image_uri", "status", "run_id"} <= set(columns):
        raise ValueError(f"compaction needs image_uri, status and run_id; got columns {columns}")
    removed_partial_files = remove_partial_files(output_uri, storage)
    rows, stems = load_image_rows(output_uri, storage, columns)
    winners, superseded = _split_winners(rows) if rows.num_rows else (rows, rows)
    result = CompactionResult(images=winners.drop_columns([_FILE]), file_index=winners[_FILE].combine_chunks(),
                              file_stems=list(stems), removed_partial_files=removed_partial_files)
    if superseded.num_rows == 0:
        return result
    superseded_by_file = {index: superseded.filter(pc.equal(superseded[_FILE], index))
                          for index in pc.unique(superseded[_FILE]).to_pylist()}
    with ThreadPoolExecutor(max_workers=min(_REWRITE_THREADS, len(superseded_by_file))) as pool:
        new_stems = list(pool.map(lambda item: _drop_rows_of_batch(output_uri, storage, stems[item[0]], item[1]),
                                  superseded_by_file.items()))
    for index, new_stem in zip(superseded_by_file, new_stems):
        (result.rewritten_stems if new_stem is not None else result.removed_stems).append(stems[index])
        result.file_stems[index] = new_stem
    result.rewritten_stems.sort()
    result.removed_stems.sort()
    return result


def _kept_digest(kept_uris: pa.Array) -> str:
    return hashlib.sha1("\n".join(sorted(kept_uris.to_pylist())).encode()).hexdigest()[:8]


def _drop_rows_of_batch(output_uri: str, storage: StorageConfig, stem: str, superseded: pa.Table) -> str | None:
    """Rewrites a batch's files without the `superseded` rows; deletes both when nothing is left.
    Returns the batch's stem afterwards, or None when the batch is gone."""
    images = read_table_file(output_uri, storage, IMAGES_DIR, stem)
    kept_images = images.filter(pc.invert(pc.is_in(images["image_uri"], value_set=superseded["image_uri"])))
    if kept_images.num_rows == 0:
        remove_table_file(output_uri, storage, IMAGES_DIR, stem)
        remove_table_file(output_uri, storage, SEGMENTS_DIR, stem)
        return None
    if not pc.any(pc.equal(superseded["status"], "ok")).as_py():
        # Error rows have no segments: the segments file stays as it is, the images file is replaced whole.
        write_table_file(output_uri, storage, IMAGES_DIR, stem, kept_images)
        return stem
    kept_uris = kept_images["image_uri"].combine_chunks()
    new_stem = f"{stem}-k{_kept_digest(kept_uris)}"  # sorts after `stem`, so it wins the tie if both survive a crash
    segments = read_table_file(output_uri, storage, SEGMENTS_DIR, stem)
    write_table_file(output_uri, storage, SEGMENTS_DIR, new_stem,
                     segments.filter(pc.is_in(segments["image_uri"], value_set=kept_uris)))
    write_table_file(output_uri, storage, IMAGES_DIR, new_stem, kept_images)
    remove_table_file(output_uri, storage, IMAGES_DIR, stem)
    remove_table_file(output_uri, storage, SEGMENTS_DIR, stem)
    return new_stem
