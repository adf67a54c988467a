"""Writes the synthetic shapes dataset (COCO instance + panoptic layout) used by tests and the demo model.

    python jobs/make_shapes_dataset.py --output data/shapes --train 4000 --val 200 --seed 0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from training.shapes import ShapesConfig, write_shapes_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="dataset root to write (created if missing)")
    parser.add_argument("--train", type=int, default=4000, help="number of training images")
    parser.add_argument("--val", type=int, default=200, help="number of validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=ShapesConfig.image_size)
    args = parser.parse_args(argv)
    root = write_shapes_dataset(args.output, splits={"train": args.train, "val": args.val}, seed=args.seed,
                                config=ShapesConfig(image_size=args.image_size))
    print(f"wrote {args.train} train + {args.val} val images to {root}")


if __name__ == "__main__":
    main()
