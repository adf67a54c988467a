"""Fine-tune (or train from scratch) Mask2Former on a COCO-format dataset with Ray Train.

    # from a checkpoint; a different label set re-initialises only the class head
    python jobs/finetune.py --data s3://bucket/coco --init-from models/m2f-shapes-tiny --num-workers 4 --use-gpu \
        --batch-size 8 --epochs 10 --storage-path s3://bucket/runs --output-model out/model
    # from scratch: a JSON file of Mask2FormerConfig kwargs and a fixed input size
    python jobs/finetune.py --data data/shapes --config configs/tiny.json --image-size 128 --num-workers 2 \
        --max-steps 2000 --output-model models/m2f-shapes-tiny

Without RAY_ADDRESS (or --address) it starts an embedded Ray on this machine; under
`ray job submit -- python jobs/finetune.py ...` it joins that cluster. Checkpoints go to
{--storage-path}/{--name}/; re-running the same command continues from the latest one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from pipeline.cli import add_storage_argument  # noqa: E402
from pipeline.local_ray import connect_ray, drop_ray_false_alarms_from_stderr  # noqa: E402
from training.finetune import run_finetune  # noqa: E402
from training.train_loop import FinetuneConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="COCO-layout dataset root, local or s3://")
    data.add_argument("--split", default="train")
    data.add_argument("--task", default="panoptic", choices=["panoptic", "instance"],
                      help="which annotation file to train on")
    add_storage_argument(data)  # s3:// data, checkpoints (--storage-path) and --init-from
    data.add_argument("--no-augment", action="store_true", help="no random scale / crop / flip")
    data.add_argument("--min-scale", type=float, default=0.8)
    data.add_argument("--max-scale", type=float, default=1.25)
    model = parser.add_argument_group("model (one of)")
    start = model.add_mutually_exclusive_group(required=True)
    start.add_argument("--init-from", help="transformers-layout checkpoint directory (local or s3://)")
    start.add_argument("--config", help="JSON file of Mask2FormerConfig kwargs: train from random weights")
    model.add_argument("--image-size", type=int, default=None,
                       help="fixed square input size of a --config model (default 384)")
    loop = parser.add_argument_group("optimisation")
    loop.add_argument("--batch-size", type=int, default=4, help="images per worker per step")
    loop.add_argument("--epochs", type=int, default=1)
    loop.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    loop.add_argument("--lr", type=float, default=1e-4)
    loop.add_argument("--backbone-lr-multiplier", type=float, default=0.1)
    loop.add_argument("--weight-decay", type=float, default=0.05)
    loop.add_argument("--warmup-steps", type=int, default=50)
    loop.add_argument("--poly-power", type=float, default=0.9)
    loop.add_argument("--gradient-clip", type=float, default=1.0)
    loop.add_argument("--no-mixed-precision", action="store_true", help="keep float32 on GPU")
    loop.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("run")
    run.add_argument("--num-workers", type=int, default=2)
    run.add_argument("--use-gpu", action="store_true")
    run.add_argument("--cpus-per-worker", type=float, default=1.0)
    run.add_argument("--storage-path", default="runs", help="checkpoint root, local or s3://")
    run.add_argument("--name", default="m2f-finetune", help="run name under --storage-path")
    run.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    run.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before giving up")
    run.add_argument("--output-model", default=None, help="export the final model (+ loss curve) here")
    run.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model_config = json.loads(Path(args.config).read_text()) if args.config else None
    config = FinetuneConfig(
        data=args.data, train_split=args.split, task=args.task, init_from=args.init_from, model_config=model_config,
        image_size=args.image_size, storage_options=args.storage_options, batch_size=args.batch_size,
        epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr,
        backbone_lr_multiplier=args.backbone_lr_multiplier, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, poly_power=args.poly_power, gradient_clip=args.gradient_clip,
        mixed_precision=not args.no_mixed_precision, augment=not args.no_augment, min_scale=args.min_scale,
        max_scale=args.max_scale, checkpoint_every=args.checkpoint_every, seed=args.seed)

    drop_ray_false_alarms_from_stderr()
    connect_ray(args.address)  # RAY_ADDRESS's cluster, else an embedded Ray on 127.0.0.1
    result = run_finetune(config, num_workers=args.num_workers, use_gpu=args.use_gpu,
                          cpus_per_worker=args.cpus_per_worker, storage_path=args.storage_path, name=args.name,
                          max_failures=args.max_failures, output_model=args.output_model)
    print(f"final metrics: {json.dumps({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})}")
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    if args.output_model:
        print(f"model exported to {args.output_model} (loss curve: {args.output_model}/loss_curve.png)")


if __name__ == "__main__":
    main()
