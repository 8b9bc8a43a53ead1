"""Throughput of the tf.data input pipeline (images/s), as training reads it.

    python benchmarks/input_pipeline.py                       # synthetic data, 256x256, batch 32
    python benchmarks/input_pipeline.py --source-size 1024    # MVTec-sized PNGs (1024x1024)
    python benchmarks/input_pipeline.py --root ~/data/mvtec_anomaly_detection --category bottle

Each epoch builds its dataset (as train.py does) and is timed end to end; the first epoch
is a warm-up (TensorFlow start-up and graph building) and is reported separately.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from rstpm_jax.data import input_pipeline, synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="", help="MVTec-layout root; empty: generate synthetic data")
    parser.add_argument("--category", default="fabric")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs after the warm-up")
    parser.add_argument("--source-size", type=int, default=128, help="synthetic image size on disk")
    parser.add_argument("--num-train", type=int, default=256, help="synthetic training images")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.expanduser(args.root)
        if not root:
            root = tmp
            t = time.perf_counter()
            synthetic.generate(root, 0, image_size=args.source_size, categories=(args.category,),
                               num_train=args.num_train)
            print(f"generated {args.num_train} {args.source_size}px images in {time.perf_counter() - t:.1f}s")
        kwargs = dict(image_size=args.image_size, global_batch_size=args.batch_size,
                      process_index=0, process_count=1)

        def epoch(e: int) -> tuple[int, float]:
            t = time.perf_counter()
            if args.split == "train":
                it = input_pipeline.train_dataset(root, args.category, seed=0, epoch=e,
                                                  holdout_fraction=0.0, **kwargs)
            else:
                it = input_pipeline.eval_dataset(root, args.category, **kwargs)
            n = sum(int(b["image"].shape[0]) for b in it)
            return n, time.perf_counter() - t

        n, dt = epoch(0)
        print(f"warm-up epoch: {n} images in {dt:.2f}s")
        total_n, total_t = 0, 0.0
        for e in range(1, args.epochs + 1):
            n, dt = epoch(e)
            total_n, total_t = total_n + n, total_t + dt
            print(f"epoch {e}: {n / dt:.0f} images/s")
        print(f"{args.split} pipeline, {args.image_size}x{args.image_size}, batch {args.batch_size}, "
              f"{os.cpu_count()} CPUs: {total_n / total_t:.0f} images/s over {total_n} images")


if __name__ == "__main__":
    main()
