"""Time XLA's convolution gradients against ``rstpm_jax.ops.conv`` on the current backend.

Per ResNet18 convolution shape: forward, input gradient and weight gradient in ms (min and
median of interleaved runs, so other load on the machine biases both sides alike), plus the
largest relative difference between the two. ``--train_step`` also times a whole STPM
student update (forward, loss, gradient) with and without the custom convolution. Both
sides compile with the library's options (``rstpm_jax.ops.compile_options``: Eigen
convolutions on CPU, where the op keeps XLA's weight gradient for kernels > 1x1); to compare
under YNNPACK fusions instead (where the op's per-tap weight gradient runs), set
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=INDIVIDUAL_CONVOLUTION,INDIVIDUAL_DOT``.

  python benchmarks/conv_grad.py --batch=32 --image_size=256 --reps=5
  python benchmarks/conv_grad.py --batch=8 --image_size=128 --train_step --only=
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from rstpm_jax.ops import compile_options, conv  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_integer("image_size", 256, "Input image side; layer shapes follow ResNet18's.")
flags.DEFINE_integer("reps", 5, "Timed repetitions per function (after one warm-up).")
flags.DEFINE_list("only", ["fwd", "dx", "dw"], "Which per-op timings to run (empty: none).")
flags.DEFINE_bool("train_step", False, "Also time a whole STPM train step.")
config_flags.DEFINE_config_file("config", "configs/stpm.py", "Config whose model section to build.")

DN = ("NHWC", "HWIO", "NHWC")


def resnet18_shapes(size: int) -> list[tuple[str, int, int, int, int, int]]:
    """``(name, spatial in, c_in, c_out, kernel, stride)`` of ResNet18's distinct convolutions."""
    return [
        ("stem 7x7/2 3->64", size, 3, 64, 7, 2),
        ("3x3 64->64", size // 4, 64, 64, 3, 1),
        ("3x3/2 64->128", size // 4, 64, 128, 3, 2),
        ("1x1/2 64->128", size // 4, 64, 128, 1, 2),
        ("3x3 128->128", size // 8, 128, 128, 3, 1),
        ("3x3/2 128->256", size // 8, 128, 256, 3, 2),
        ("1x1/2 128->256", size // 8, 128, 256, 1, 2),
        ("3x3 256->256", size // 16, 256, 256, 3, 1),
        ("3x3/2 256->512", size // 16, 256, 512, 3, 2),
        ("3x3 512->512", size // 32, 512, 512, 3, 1),
    ]


def timed(fns: dict[str, Callable], args: tuple, reps: int) -> dict[str, list[float]]:
    """Interleaved wall times (ms) of already-jitted ``fns`` on ``args``."""
    for f in fns.values():
        jax.block_until_ready(f(*args))
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[n].append(1000 * (time.perf_counter() - t0))
    return times


def _rel_err(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))


def bench_op(name: str, batch: int, size: int, cin: int, cout: int, k: int, s: int,
             parts: list[str], reps: int) -> None:
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (batch, size, size, cin))
    w = jax.random.normal(kw, (k, k, cin, cout)) * (2.0 / (k * k * cout)) ** 0.5
    pads = ((k // 2, k // 2),) * 2

    def make(fn):
        f = lambda x, w: fn(x, w, (s, s), pads, dimension_numbers=DN)  # noqa: E731
        jit = compile_options.jit
        return {"fwd": jit(f),
                "dx": jit(lambda x, w, g: jax.vjp(f, x, w)[1](g)[0]),
                "dw": jit(lambda x, w, g: jax.vjp(f, x, w)[1](g)[1])}

    ref, ours = make(lax.conv_general_dilated), make(conv.conv_general_dilated)
    g = jax.random.normal(kg, ref["fwd"](x, w).shape)
    for part in parts:
        args = (x, w) if part == "fwd" else (x, w, g)
        t = timed({"xla": ref[part], "ours": ours[part]}, args, reps)
        err = _rel_err(ref[part](*args), ours[part](*args))
        xla, own = min(t["xla"]), min(t["ours"])
        print(f"{name:18s} {size:4d}px {part:3s}  xla {xla:8.1f} ms "
              f"(med {np.median(t['xla']):8.1f})  ours {own:8.1f} ms "
              f"(med {np.median(t['ours']):8.1f})  x{xla / own:5.2f}"
              f"  rel.err {err:.1e}", flush=True)


def bench_train_step(batch: int, size: int, reps: int, model_cfg) -> None:
    """A minimal student update: teacher features, paper loss, gradient w.r.t. student params."""
    from rstpm_jax import losses
    from rstpm_jax.models import rstpm

    images = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3))

    def make(fast: bool):
        model = rstpm.build_model(model_cfg, fast_cpu_ops=fast)
        tvars, svars = model.init(jax.random.PRNGKey(0), images.shape)

        def loss_fn(params, batch_stats, x):
            teacher = model.teacher_features(tvars, x)
            feats, updates = model.student_features(
                {"params": params, "batch_stats": batch_stats}, x, teacher, train=True)
            loss, _ = losses.paper_loss(rstpm.feature_pairs(teacher, feats))
            return loss, updates

        step = compile_options.jit(jax.grad(loss_fn, has_aux=True))
        return step, (svars["params"], svars["batch_stats"], images)

    (xla_step, args), (own_step, _) = make(False), make(True)
    t = timed({"xla": xla_step, "ours": own_step}, args, reps)
    gx, go = xla_step(*args)[0], own_step(*args)[0]
    err = max(_rel_err(a, b) for a, b in zip(jax.tree.leaves(gx), jax.tree.leaves(go)))
    xla, own = min(t["xla"]), min(t["ours"])
    print(f"train step ({model_cfg.teacher1}, student2={model_cfg.student2}, batch {batch}, "
          f"{size}px): xla {xla:.0f} ms (med {np.median(t['xla']):.0f})  ours {own:.0f} ms "
          f"(med {np.median(t['ours']):.0f})"
          f"  x{xla / own:.2f}  max rel.err of grads {err:.1e}", flush=True)


def main(argv: list[str]) -> None:
    del argv
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); "
          f"batch {FLAGS.batch}, image {FLAGS.image_size}px; min of {FLAGS.reps} runs")
    parts = [p for p in FLAGS.only if p]
    bad = set(parts) - {"fwd", "dx", "dw"}
    if bad:
        raise app.UsageError(f"--only takes fwd, dx, dw; got {sorted(bad)}.")
    if parts:
        for name, size, cin, cout, k, s in resnet18_shapes(FLAGS.image_size):
            bench_op(name, FLAGS.batch, size, cin, cout, k, s, parts, FLAGS.reps)
    if FLAGS.train_step:
        bench_train_step(FLAGS.batch, FLAGS.image_size, FLAGS.reps, FLAGS.config.model)


if __name__ == "__main__":
    app.run(main)
