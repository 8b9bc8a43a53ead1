"""PyTorch STFPM reference: the speed that ``configs/stpm.py`` is compared with.

  python benchmarks/torch_stfpm.py --image_size=256 --batch_size=32 --steps=5 [--device=cuda] [--out=F.json]

The model has the shape of anomalib's STFPM (2.x): a torchvision ResNet18 teacher (frozen,
eval mode, no gradient) and a ResNet18 student up to ``layer3`` (training mode); features
of ``layer1..3``. Loss: ``configs/stpm.py``'s (``loss.name=stpm``, the official STPM code's):
features L2-normalised along channels, squared distance per position, mean over positions
and the batch, summed over the three levels; anomalib's ``STFPMLoss`` halves it and sums over
the batch, which only scales the gradient. SGD lr 0.4, momentum 0.9,
weight decay 1e-4. Inference: per-level distance maps resized bilinearly to the input and
multiplied; the score is the map's maximum. NCHW float32, eager mode; the weights are random
(speed does not depend on them). The issue measured anomalib 2.7 at 4.4 images/s (train
step) and 10.2 images/s (inference) on 2 CPU cores at 256x256, batch 32, float32.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch convention
import torchvision
from bench_memory import peak_rss_bytes  # benchmarks/ is the script's folder

LEVELS = ("layer1", "layer2", "layer3")


def features(net: torchvision.models.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """``layer1..3`` outputs of a torchvision ResNet (``layer4`` and the head are not run)."""
    y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    out = []
    for name in LEVELS:
        y = getattr(net, name)(y)
        out.append(y)
    return out


class STFPM(torch.nn.Module):
    """Frozen teacher + trainable student, both torchvision ResNet18."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher = torchvision.models.resnet18(weights=None)
        self.student = torchvision.models.resnet18(weights=None)
        self.student.layer4 = torch.nn.Identity()  # the student stops at layer3
        self.student.fc = torch.nn.Identity()
        self.teacher.requires_grad_(False)

    def train(self, mode: bool = True) -> STFPM:
        super().train(mode)
        self.teacher.eval()  # BatchNorm of the teacher always in inference mode
        return self

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            t = features(self.teacher, x)
        return t, features(self.student, x)


def distance_map(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """1/2 ||t^ - s^||^2 per position of L2-normalised (channel) features: (B, H, W)."""
    return 0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(1)


def stfpm_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over levels of the mean over (batch, positions) of ``||t^ - s^||^2``: twice the
    mean of :func:`distance_map` (the official STPM code's loss, ``rstpm_jax.losses.stpm_loss``)."""
    return sum(2.0 * distance_map(t, s).mean(dim=(1, 2)).mean() for t, s in zip(teacher, student))


def anomaly_map(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                size: tuple[int, int]) -> torch.Tensor:
    """Product over levels of the distance maps resized (bilinear) to ``size``: (B, H, W)."""
    out = None
    for t, s in zip(teacher, student):
        m = F.interpolate(distance_map(t, s)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        out = m if out is None else out * m
    return out


def make_optimizer(model: STFPM) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.student.parameters(), lr=0.4, momentum=0.9, weight_decay=1e-4)


def train_step(model: STFPM, opt: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = stfpm_loss(*model(x))
    loss.backward()
    opt.step()
    return loss.detach()


@torch.inference_mode()
def infer(model: STFPM, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    amap = anomaly_map(*model(x), tuple(x.shape[2:]))
    return amap, amap.flatten(1).amax(1)


def _timed(fn: Callable[[], Any], steps: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``steps`` calls after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(max(1, steps)):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _flops(fn: Callable[[], Any]) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover - torch < 2.1
        return None
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def measure(image_size: int = 256, batch_size: int = 32, steps: int = 5, device: str = "auto",
            threads: int = 0, seed: int = 0) -> dict[str, Any]:
    """Train-step and inference images/s of the reference; a record like benchmarks/throughput.py's."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model = STFPM().to(dev)
    opt = make_optimizer(model)
    x = torch.randn(batch_size, 3, image_size, image_size, device=dev)
    x1 = x[:1].clone()
    t_train = _timed(lambda: train_step(model, opt, x), steps, sync)
    t_infer = _timed(lambda: infer(model, x), steps, sync)
    t_infer1 = _timed(lambda: infer(model, x1), max(steps, 5), sync)
    train_flops = _flops(lambda: train_step(model, opt, x))
    infer_flops = _flops(lambda: infer(model, x))
    if dev.type == "cuda":
        peak, source = int(torch.cuda.max_memory_allocated(dev)), "torch.cuda.max_memory_allocated"
    else:
        peak, source = peak_rss_bytes(), "process peak RSS"
    return {
        "model": "torch_stfpm", "framework": "pytorch", "torch_version": torch.__version__,
        "dtype": "float32", "image_size": image_size, "batch_size": batch_size, "steps": steps,
        "device": device, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "train_step_s": t_train, "train_images_per_s": batch_size / t_train,
        "infer_images_per_s": batch_size / t_infer, "infer_batch1_images_per_s": 1.0 / t_infer1,
        "flops_per_image": None if train_flops is None else train_flops / batch_size,
        "infer_flops_per_image": None if infer_flops is None else infer_flops / batch_size,
        "flops_source": "torch.utils.flop_counter (matmul/conv only)",
        "peak_memory_bytes": peak, "peak_memory_source": source,
    }


def main(argv: list[str]) -> None:
    from absl import app, flags  # noqa: PLC0415

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.device not in ("auto", "cpu", "cuda"):
        raise app.UsageError(f"--device must be auto, cpu or cuda, got {f.device!r}.")
    rec = measure(f.image_size, f.batch_size, f.steps, f.device, f.threads)
    print(f"PyTorch STFPM {rec['device']} ({rec['threads']} threads), {f.image_size}px batch {f.batch_size}: "
          f"train {rec['train_images_per_s']:.2f} images/s, inference {rec['infer_images_per_s']:.2f} "
          f"images/s (batch 1: {rec['infer_batch1_images_per_s']:.2f})", flush=True)
    if f.out:
        with open(f.out, "w") as fh:
            json.dump(rec, fh, indent=2)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_integer("image_size", 256, "Image side.")
    flags.DEFINE_integer("batch_size", 32, "Batch size.")
    flags.DEFINE_integer("steps", 5, "Timed steps (median) after one warm-up.")
    flags.DEFINE_string("device", "auto", "auto (cuda if available), cpu or cuda.")
    flags.DEFINE_integer("threads", 0, "torch.set_num_threads; 0: torch's default.")
    flags.DEFINE_string("out", "", "Write the record as JSON here.")
    app.run(main)
