"""What report.json counts, aggregated as the results stream in: the driver keeps a few counters, never a row.

A 10M-image run sends 10M images rows back to the driver, a batch at a time; `ResultTally.add` folds each
batch into counters with Arrow kernels and lets it go, and `output_totals` sums the winning rows of the
whole output the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.records import TASKS

__all__ = ["RESULT_COLUMNS", "ResultTally", "output_totals"]

# The columns of the images rows the tally reads.
RESULT_COLUMNS: tuple[str, ...] = ("status", "error_stage", *(f"{task}_segments" for task in TASKS))


@dataclass
class ResultTally:
    """Counts of the images rows this run committed, and when they arrived (monotonic seconds)."""

    processed: int = 0
    ok: int = 0
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    segments: dict[str, int] = field(default_factory=lambda: {task: 0 for task in TASKS})  # over ok rows
    first_arrival: float | None = None
    processed_after_first: int = 0  # rows that arrived after the first batch: the steady-state rate's numerator

    def add(self, batch: pa.Table, arrived: float) -> None:
        """Folds one batch of images rows (at least RESULT_COLUMNS) that reached the driver at `arrived`."""
        if batch.num_rows == 0:
            return
        is_ok = pc.equal(batch["status"], "ok")
        ok_rows = batch.filter(is_ok)
        self.processed += batch.num_rows
        self.ok += ok_rows.num_rows
        for task in TASKS:
            self.segments[task] += pc.sum(ok_rows[f"{task}_segments"]).as_py() or 0
        failed_stages = batch.filter(pc.invert(is_ok))["error_stage"]
        if len(failed_stages):
            for entry in pc.value_counts(failed_stages).to_pylist():
                self.errors_by_stage[entry["values"]] = self.errors_by_stage.get(entry["values"], 0) + entry["counts"]
        if self.first_arrival is None:
            self.first_arrival = arrived
        else:
            self.processed_after_first += batch.num_rows

    @property
    def errors(self) -> int:
        return self.processed - self.ok

    def steady_state(self, pipeline_started: float, pipeline_seconds: float) -> dict:
        """Rate once the first batch is out (actor start-up excluded): what a long run converges to."""
        if self.first_arrival is None:
            return {"pipeline_first_result_s": None, "steady_images_per_s": None}
        first = self.first_arrival - pipeline_started
        steady_seconds = pipeline_seconds - first
        return {"pipeline_first_result_s": round(first, 3),
                "steady_images_per_s": round(self.processed_after_first / steady_seconds, 4)
                if self.processed_after_first and steady_seconds > 0 else None}


def output_totals(images: pa.Table) -> dict:
    """Counts over the output's winning images rows (one per input): images, ok, errors, segments per task."""
    ok = pc.sum(pc.equal(images["status"], "ok")).as_py() or 0
    return {"images": images.num_rows, "ok": ok, "errors": images.num_rows - ok,
            "segments": {task: pc.sum(images[f"{task}_segments"]).as_py() or 0 for task in TASKS}}
