"""The read stage: bytes in listing order, and unreadable or oversized objects as 'read' error rows."""
from __future__ import annotations

import pyarrow as pa

from pipeline.read import read_objects
from pipeline.storage import StorageConfig

STORAGE = StorageConfig.resolve({}, environ={})


def test_bytes_arrive_in_order_and_failures_become_read_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(b"A" * 10)
    (tmp_path / "big.png").write_bytes(b"B" * 101)
    (tmp_path / "empty.png").write_bytes(b"")
    uris = [str(tmp_path / n) for n in ("a.png", "missing.png", "big.png", "empty.png")]
    batch = pa.table({"image_uri": uris, "image_id": ["a", "missing", "big", "empty"]})
    rows = read_objects(batch, storage=STORAGE, max_object_bytes=100).to_pylist()
    assert [r["image_uri"] for r in rows] == uris
    assert rows[0]["data"] == b"A" * 10 and rows[0]["error_stage"] is None
    assert rows[1]["error_stage"] == "read" and rows[1]["error_type"] == "FileNotFoundError"
    assert rows[2]["error_stage"] == "read" and "limit of 100 bytes" in rows[2]["error_message"]
    assert rows[3]["data"] == b"" and rows[3]["error_stage"] is None, "empty objects fail later, in decode"
