"""Diagnose the six maps and their fusion (issue 16) on the synthetic categories.

    python benchmarks/diagnose_fusion.py --out /tmp/diag [--epochs 6] [--image_size 64] \
        [--categories fabric,mesh,button,gravel] [--models stpm,rstpm,rstpm_no_attention,rstpm_r18_r18]

Trains each model (random teachers; ``python -m rstpm_jax.main``, skipped when its workdir is
complete) on the synthetic data (``gravel``: the texture-like category), then prints:

1. per-map pixel AUROC (student 1 and 2 at 1/4, 1/8, 1/16) and the fused map's under the
   paper's ``multiply``, ``normalized_multiply`` and ``normalized_sum`` (same checkpoint; the
   normalised rules' statistics from the held-out normal images);
2. per defect type, the pixel AUROC of each student's maps added over levels (a flat defect
   reconstructed better than the normal texture shows as < 0.5 for student 2);
3. the gates: mean attention over normal and defect positions, the fractions above 0.99 and
   below 0.01, and the gate's own AUROC for defect positions;
4. how well each student fits its target on held-out normal images: the per-level loss
   (mean of ||t^ - s^||^2) against that of the best constant (the mean teacher direction).

Everything printed is also written to ``OUT/diagnosis.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIGS = {"stpm": "stpm.py", "rstpm": "mvtec.py", "rstpm_no_attention": "rstpm_no_attention.py",
           "rstpm_r18_r18": "rstpm_r18_r18.py", "stpm_attention": "stpm_attention.py"}
FUSIONS = ("multiply", "normalized_multiply", "normalized_sum")
LEVELS = ("layer1", "layer2", "layer3")


def train(model: str, out: str, root: str, args) -> str:
    workdir = os.path.join(out, model)
    if all(os.path.isfile(os.path.join(workdir, c, "results.json")) for c in args.categories):
        return workdir
    cmd = [sys.executable, "-m", "rstpm_jax.main", f"--config={REPO}/configs/{CONFIGS[model]}",
           f"--workdir={workdir}", f"--config.data.root={root}", "--config.data.generate_synthetic=False",
           f"--config.data.categories={','.join(args.categories)}", "--config.model.random_teachers=True",
           f"--config.data.image_size={args.image_size}", f"--config.train.epochs={args.epochs}",
           "--config.train.batch_size=8", f"--config.train.learning_rate={args.lr}",
           "--config.train.select_epoch=last", "--config.eval.figures=False", "--config.data.holdout_fraction=0.25",
           f"--config.seed={args.seed}"]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    print(f"training {model} ...", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    return workdir


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, np.float64).reshape(-1)))


def _pool_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(B, H, W) mask -> (B, h, w) defect fraction of each feature position."""
    b, h, w = mask.shape
    fh, fw = h // shape[0], w // shape[1]
    return mask.reshape(b, shape[0], fh, shape[1], fw).mean(axis=(2, 4))


def diagnose(model_name: str, workdir: str, category: str) -> dict:
    import jax
    import jax.numpy as jnp

    from rstpm_jax import evaluate, sharding
    from rstpm_jax import workdir as workdir_lib
    from rstpm_jax.data import input_pipeline
    from rstpm_jax.data.sources import Source
    from rstpm_jax.models.rstpm import attention_maps, feature_pairs

    config = workdir_lib.load_config(workdir)
    mesh = sharding.make_mesh()
    model, tv, sv = workdir_lib.load_trained(config, workdir, category, mesh)
    source = Source(os.path.abspath(str(config.data.root)))
    out: dict = {"model": model_name, "category": category}

    for fusion in FUSIONS:  # the same checkpoint under each rule
        cfg = config.copy_and_resolve_references()
        with cfg.unlocked():
            cfg.maps.fusion = fusion
            cfg.eval.figures = False
        ev = evaluate.evaluate_category(cfg, source, category, model, tv, sv, mesh)
        out[f"fused/{fusion}"] = ev.metrics["pixel_auroc"]
        out[f"image/{fusion}"] = ev.metrics["image_auroc"]
        if fusion == "multiply":
            out.update({k[len("per_level/"):]: v for k, v in ev.metrics.items()
                        if k.startswith("per_level/") and k.endswith("/pixel_auroc")})

    @jax.jit
    def features(tv, sv, images):
        teacher = model.teacher_features(tv, images)
        student, sown = model.student_features(sv, images, teacher, train=False,
                                               capture_attention=model.has_attention)
        pairs = feature_pairs(teacher, student)
        unit = jax.tree.map(lambda f: f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + 1e-12), pairs)
        att = attention_maps(sown["intermediates"]) if model.has_attention else {}
        return unit, att, teacher["teacher1"].get("layer4")  # student 2's input (RSTPM only)

    def batches(split):
        for b in input_pipeline.eval_dataset(source.root, category, split=split,
                                             image_size=int(config.data.image_size), global_batch_size=16,
                                             holdout_fraction=float(config.data.holdout_fraction),
                                             seed=int(config.seed)):
            keep = b["valid"].astype(bool)
            got = jax.device_get(features(tv, sv, b["image"]))
            yield {k: v[keep] for k, v in b.items()}, jax.tree.map(lambda x, k=keep: x[k], got)

    # Fit on held-out normal images: the student's loss against the best constant's, and for
    # student 2 against a ridge probe from its input (teacher 1's layer4, nearest-upsampled),
    # fitted on the training images: how much of the target the input can explain linearly.
    held = list(batches("holdout"))
    units = [u for _, (u, _, _) in held]
    if "student2" in units[0]:
        train_b = list(batches("train"))
        for lvl in LEVELS:
            def xy(bs, lvl=lvl):
                t = np.concatenate([u["student2"][lvl][0] for _, (u, _, _) in bs])
                x4 = np.concatenate([x for _, (_, _, x) in bs])
                f = t.shape[1] // x4.shape[1]
                x = np.repeat(np.repeat(x4, f, axis=1), f, axis=2)
                x = x.reshape(-1, x.shape[-1])
                return np.concatenate([x, np.ones((len(x), 1), x.dtype)], 1), t.reshape(len(x), -1)
            x, y = xy(train_b)
            w = np.linalg.solve(x.T @ x + 1e-2 * len(x) * np.eye(x.shape[1]), x.T @ y)
            xh, yh = xy(held)
            p = xh @ w
            p /= np.linalg.norm(p, axis=-1, keepdims=True) + 1e-12
            out[f"fit/student2/{lvl}/probe"] = float(np.mean(np.sum((yh - p) ** 2, -1)))
    for s in units[0]:
        for lvl in LEVELS:
            t = np.concatenate([u[s][lvl][0] for u in units]).reshape(-1, units[0][s][lvl][0].shape[-1])
            st = np.concatenate([u[s][lvl][1] for u in units]).reshape(t.shape)
            c = t.mean(axis=0)
            c /= np.linalg.norm(c) + 1e-12
            out[f"fit/{s}/{lvl}/loss"] = float(np.mean(np.sum((t - st) ** 2, -1)))
            out[f"fit/{s}/{lvl}/constant"] = float(np.mean(np.sum((t - c) ** 2, -1)))

    # Per defect type: each student's summed maps; the gates over normal and defect positions.
    items = input_pipeline.test_items(source.root, category)
    maps: dict[str, list] = {}
    masks, defects, gates = [], [], {}
    for inputs, (unit, att, _) in batches("test"):
        masks.append(inputs["mask"])
        defects += [items[int(i)].defect for i in inputs["index"]]
        size = inputs["mask"].shape[1:3]
        for s, levels in unit.items():
            d = sum(jax.image.resize(0.5 * np.sum((t - st) ** 2, -1), (len(t), *size), "bilinear")
                    for t, st in levels.values())
            maps.setdefault(s, []).append(np.asarray(d))
        for s, levels in att.items():
            for lvl, a in levels.items():
                gates.setdefault((s, lvl), []).append((a, _pool_mask(inputs["mask"], a.shape[1:])))
    mask = np.concatenate(masks) > 0.5
    defects = np.array(defects)
    for s, chunks in maps.items():
        m = np.concatenate(chunks)
        for d in sorted(set(defects) - {"good"}):
            sel = (defects == d) | (defects == "good")
            out[f"defect/{d}/{s}"] = _auroc(m[sel], mask[sel])
    for (s, lvl), chunks in gates.items():
        a = np.concatenate([c[0] for c in chunks]).reshape(-1)
        frac = np.concatenate([c[1] for c in chunks]).reshape(-1)
        defect, normal = frac >= 0.5, frac == 0
        out[f"gate/{s}/{lvl}"] = {"normal_mean": float(a[normal].mean()), "defect_mean": float(a[defect].mean()),
                                  "above_0.99": float((a > 0.99).mean()), "below_0.01": float((a < 0.01).mean()),
                                  "auroc": _auroc(a[defect | normal], defect[defect | normal])}
    return out


def _f(v) -> str:
    return "  –  " if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def print_tables(rows: list[dict]) -> None:
    print("\n## Per-map pixel AUROC (1/4, 1/8, 1/16) and the fused map's\n")
    print("| model | category | s1 1/4 | s1 1/8 | s1 1/16 | s2 1/4 | s2 1/8 | s2 1/16 | multiply | "
          "normalized_multiply | normalized_sum |")
    print("|---" * 11 + "|")
    for r in rows:
        cells = [r.get(f"{s}/{lvl}/pixel_auroc") for s in ("student1", "student2") for lvl in LEVELS]
        print(f"| {r['model']} | {r['category']} | " + " | ".join(_f(c) for c in cells) + " | "
              + " | ".join(_f(r[f"fused/{f}"]) for f in FUSIONS) + " |")
    print("\n## Pixel AUROC per defect type of each student's maps (levels added)\n")
    print("| model | category | defect | student1 | student2 |\n|---|---|---|---|---|")
    for r in rows:
        for k in sorted(k for k in r if k.startswith("defect/") and k.endswith("/student1")):
            d = k.split("/")[1]
            print(f"| {r['model']} | {r['category']} | {d} | {_f(r[k])} | {_f(r.get(f'defect/{d}/student2'))} |")
    print("\n## Gates over test images (attention in [0, 1])\n")
    print("| model | category | gate | mean normal | mean defect | >0.99 | <0.01 | gate AUROC |")
    print("|---" * 8 + "|")
    for r in rows:
        for k in sorted(k for k in r if k.startswith("gate/")):
            g = r[k]
            print(f"| {r['model']} | {r['category']} | {k[5:]} | {_f(g['normal_mean'])} | {_f(g['defect_mean'])} "
                  f"| {_f(g['above_0.99'])} | {_f(g['below_0.01'])} | {_f(g['auroc'])} |")
    print("\n## Fit on held-out normal images: loss (mean ||t^ - s^||^2) / best constant's "
          "[/ ridge probe from teacher 1's layer4, student 2]\n")
    print("| model | category | " + " | ".join(f"{s} {lvl}" for s in ("s1", "s2") for lvl in LEVELS) + " |")
    print("|---" * 8 + "|")
    for r in rows:
        cells = []
        for s in ("student1", "student2"):
            for lvl in LEVELS:
                loss, const = r.get(f"fit/{s}/{lvl}/loss"), r.get(f"fit/{s}/{lvl}/constant")
                probe = r.get(f"fit/{s}/{lvl}/probe")
                cells.append("–" if loss is None else f"{loss:.3f} / {const:.3f}"
                             + (f" / {probe:.3f}" if probe is not None else ""))
        print(f"| {r['model']} | {r['category']} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--categories", default="fabric,mesh,button,gravel")
    parser.add_argument("--models", default="stpm,rstpm,rstpm_no_attention")
    args = parser.parse_args(argv)
    args.categories = [c for c in args.categories.split(",") if c]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from rstpm_jax.data import synthetic

    root = os.path.join(os.path.abspath(args.out), "data")
    missing = tuple(c for c in args.categories if not os.path.isdir(os.path.join(root, c)))
    if missing:
        synthetic.generate(root, seed=args.seed, image_size=args.image_size, categories=missing)
    rows = []
    for model in args.models.split(","):
        workdir = train(model, os.path.abspath(args.out), root, args)
        for category in args.categories:
            rows.append(diagnose(model, workdir, category))
            print(json.dumps({k: v for k, v in rows[-1].items() if k.startswith("fused/")}), flush=True)
    with open(os.path.join(args.out, "diagnosis.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print_tables(rows)


if __name__ == "__main__":
    main()
