"""A labeling run's tables as COCO files that review and annotation tools read (FiftyOne, CVAT, Label Studio,
pycocotools, panopticapi):

    <export>/instances.json            COCO instance results: RLE segmentations with scores
    <export>/panoptic.json             COCO panoptic: one annotation per image, segments_info with scores
    <export>/panoptic/<name>.png       segment ids as R + 256 G + 256^2 B (0 = no segment)

Only committed rows are exported (`pipeline.run_tables`), images that failed are left out. Categories are the
model's labels: category id = label id + 1 (COCO keeps 0 free), name = label; a label the run fused in panoptic
(`--label-ids-to-fuse`, stuff) is `isthing: 0`. `file_name` is the table's image_id: the path under the input
folder (or the manifest's id), so a tool pointed at the input folder finds the images.
"""
from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image
from pycocotools import mask as coco_mask

from pipeline.rle import encode_mask
from pipeline.records import IMAGES_SCHEMA, SEGMENTS_SCHEMA, table_from_records
from pipeline.run_tables import RunTables, read_run_tables
from pipeline.storage import StorageConfig, join_uri

__all__ = ["INSTANCES_FILE", "PANOPTIC_FILE", "PANOPTIC_DIR", "ExportSummary", "export_coco", "read_coco_export",
           "panoptic_png_name"]

INSTANCES_FILE = "instances.json"
PANOPTIC_FILE = "panoptic.json"
PANOPTIC_DIR = "panoptic"
_MAX_PANOPTIC_ID = 256 ** 3 - 1


@dataclass
class ExportSummary:
    images: int
    skipped_error_images: int
    instance_annotations: int
    panoptic_segments: int
    files: list[str]


def panoptic_png_name(file_name: str, taken: set[str]) -> str:
    """`a/b.jpg` -> `a/b.png` (COCO's convention), or `a/b.jpg.png` when another image already took that name."""
    name = posixpath.splitext(file_name.lstrip("/"))[0] + ".png"
    if name in taken:
        name = file_name.lstrip("/") + ".png"
    taken.add(name)
    return name


def _categories(id2label: dict[int, str], stuff_label_ids: set[int]) -> list[dict]:
    return [{"id": label_id + 1, "name": name, "supercategory": "",
             "isthing": 0 if label_id in stuff_label_ids else 1}
            for label_id, name in sorted(id2label.items())]


def export_coco(run_uri: str, export_uri: str, *, storage: StorageConfig, id2label: dict[int, str],
                stuff_label_ids: set[int] = frozenset()) -> ExportSummary:
    """Writes the COCO instance and panoptic files of the run in `run_uri` under `export_uri`."""
    tables = read_run_tables(run_uri, storage)
    ok_images = sorted((row for row in tables.images.to_pylist() if row["status"] == "ok"),
                       key=lambda row: row["image_id"])
    images = [{"id": number, "file_name": row["image_id"], "height": int(row["height"]), "width": int(row["width"]),
               "m2f_image_uri": row["image_uri"]} for number, row in enumerate(ok_images, start=1)]
    coco_id_by_uri = {image["m2f_image_uri"]: image["id"] for image in images}
    segments_by_uri: dict[str, list[dict]] = {}
    for row in tables.segments.to_pylist():
        segments_by_uri.setdefault(row["image_uri"], []).append(row)
    categories = _categories(id2label, set(stuff_label_ids))

    instance_annotations = []
    panoptic_annotations = []
    png_names: set[str] = set()
    files = []
    for image in images:
        rows = segments_by_uri.get(image["m2f_image_uri"], [])
        for row in (r for r in rows if r["task"] == "instance"):
            instance_annotations.append({
                "id": len(instance_annotations) + 1, "image_id": image["id"], "category_id": row["label_id"] + 1,
                "segmentation": {"size": list(row["rle_size"]), "counts": row["rle_counts"]},
                "area": int(row["area"]), "bbox": [float(v) for v in row["bbox"]], "score": float(row["score"]),
                "iscrowd": 0})
        panoptic_rows = [r for r in rows if r["task"] == "panoptic"]
        ids = np.zeros((image["height"], image["width"]), dtype=np.uint32)  # (height, width) segment ids
        segments_info = []
        for row in panoptic_rows:
            if not 0 < row["segment_id"] <= _MAX_PANOPTIC_ID:
                raise ValueError(f"panoptic segment id {row['segment_id']} of {image['file_name']} does not fit "
                                 "a COCO panoptic PNG (1 .. 256^3 - 1)")
            mask = coco_mask.decode({"size": list(row["rle_size"]), "counts": row["rle_counts"].encode("ascii")})
            ids[mask.astype(bool)] = row["segment_id"]
            segments_info.append({"id": int(row["segment_id"]), "category_id": row["label_id"] + 1,
                                  "area": int(row["area"]), "bbox": [float(v) for v in row["bbox"]],
                                  "iscrowd": 0, "score": float(row["score"])})
        png_name = panoptic_png_name(image["file_name"], png_names)
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)  # (height, width, 3)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG")
        png_uri = join_uri(export_uri, PANOPTIC_DIR, *png_name.split("/"))
        storage.write_bytes(png_uri, buffer.getvalue())
        panoptic_annotations.append({"image_id": image["id"], "file_name": png_name, "segments_info": segments_info})

    info = {"description": f"m2f labeling run {run_uri}", "run_ids": sorted(set(tables.images["run_id"].to_pylist()))}
    for name, payload in ((INSTANCES_FILE, {"info": info, "images": images, "annotations": instance_annotations,
                                            "categories": categories}),
                          (PANOPTIC_FILE, {"info": info, "images": images, "annotations": panoptic_annotations,
                                           "categories": categories})):
        uri = join_uri(export_uri, name)
        storage.write_text(uri, json.dumps(payload))
        files.append(uri)
    return ExportSummary(images=len(images), skipped_error_images=tables.images.num_rows - len(images),
                         instance_annotations=len(instance_annotations),
                         panoptic_segments=sum(len(a["segments_info"]) for a in panoptic_annotations),
                         files=[*files, join_uri(export_uri, PANOPTIC_DIR)])


def read_coco_export(export_uri: str, *, storage: StorageConfig | None = None) -> RunTables:
    """An export read back into the tables' schemas (panoptic and instance segments; image_uri = file_name)."""
    storage = StorageConfig.coerce(storage)
    instances = json.loads(storage.read_bytes(join_uri(export_uri, INSTANCES_FILE)))
    panoptic = json.loads(storage.read_bytes(join_uri(export_uri, PANOPTIC_FILE)))
    label_by_category = {c["id"]: c["name"] for c in instances["categories"]}
    image_by_id = {image["id"]: image for image in instances["images"]}
    segments = []

    def row(image: dict, task: str, segment_id: int, category_id: int, score: float, rle: dict) -> dict:
        return {"image_uri": image["file_name"], "image_id": image["file_name"], "height": image["height"],
                "width": image["width"], "task": task, "segment_id": segment_id, "label_id": category_id - 1,
                "label": label_by_category[category_id], "score": score, "area": rle["area"], "bbox": rle["bbox"],
                "rle_size": rle["size"], "rle_counts": rle["counts"], "was_fused": False, "model": "",
                "run_id": ""}

    for annotation in instances["annotations"]:
        rle = dict(annotation["segmentation"], area=annotation["area"], bbox=annotation["bbox"])
        segments.append(row(image_by_id[annotation["image_id"]], "instance", annotation["id"],
                            annotation["category_id"], annotation["score"], rle))
    for annotation in panoptic["annotations"]:
        image = image_by_id[annotation["image_id"]]
        png = storage.read_bytes(join_uri(export_uri, PANOPTIC_DIR, *annotation["file_name"].split("/")))
        with Image.open(io.BytesIO(png)) as decoded:
            rgb = np.asarray(decoded.convert("RGB"), dtype=np.uint32)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]  # (height, width)
        for info in annotation["segments_info"]:
            segments.append(row(image, "panoptic", info["id"], info["category_id"], info.get("score", 1.0),
                                encode_mask(ids == info["id"])))
    images = [{"image_uri": image["file_name"], "image_id": image["file_name"], "status": "ok",
               "height": image["height"], "width": image["width"], "run_id": ""} for image in instances["images"]]
    return RunTables(images=pa.Table.from_pylist(images, schema=IMAGES_SCHEMA),
                     segments=table_from_records(segments, SEGMENTS_SCHEMA))
