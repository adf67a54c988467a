"""Reading a labeling run's tables as the job itself sees them: committed batches only, latest row per image.

Read-only (unlike `pipeline.resume.compact`, which also cleans up): temporary files, segments files whose images
file was never written (a batch killed between its two writes) and rows superseded by a later run are left out,
so evaluation and exports of a killed or resumed run see exactly what a finished run would hold.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.records import SEGMENTS_SCHEMA
from pipeline.resume import load_image_rows, winning_rows
from pipeline.sinks import SEGMENTS_DIR, read_table_file
from pipeline.storage import StorageConfig

__all__ = ["RunTables", "read_run_tables"]


@dataclass
class RunTables:
    images: pa.Table  # one row per input: its latest committed images row (IMAGES_SCHEMA)
    segments: pa.Table  # the segments of the images whose latest row is 'ok' (SEGMENTS_SCHEMA)

    def ok_image_uris(self) -> set[str]:
        return set(self.images.filter(pc.equal(self.images["status"], "ok"))["image_uri"].to_pylist())


def read_run_tables(output_uri: str, storage: StorageConfig) -> RunTables:
    """The committed tables of the run in `output_uri` (local or any fsspec URI)."""
    winners = winning_rows(load_image_rows(output_uri, storage))
    if winners.num_rows == 0:
        raise FileNotFoundError(f"no committed images/*.parquet under {output_uri}; pass the --output folder of "
                                "jobs/segment_bucket.py")
    ok = winners.filter(pc.equal(winners["status"], "ok"))
    uris_by_stem: dict[str, list[str]] = {}
    for uri, stem in zip(ok["image_uri"].to_pylist(), ok["_stem"].to_pylist()):
        uris_by_stem.setdefault(stem, []).append(uri)
    segments = [read_table_file(output_uri, storage, SEGMENTS_DIR, stem).cast(SEGMENTS_SCHEMA)
                for stem in sorted(uris_by_stem)]
    segments = [table.filter(pc.is_in(table["image_uri"], pa.array(uris_by_stem[stem], pa.string())))
                for table, stem in zip(segments, sorted(uris_by_stem))]
    return RunTables(images=winners.drop_columns(["_stem"]),
                     segments=pa.concat_tables(segments) if segments else SEGMENTS_SCHEMA.empty_table())
