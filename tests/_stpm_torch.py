"""An independent PyTorch implementation of the official STPM training step (gdwang08/STFPM
``main.py``, ``train_val``), and anomalib's ``STFPMLoss``, to test this project against.

Official procedure, as implemented here:

- teacher and student are torchvision ``resnet18``; features are the outputs of ``layer1``,
  ``layer2``, ``layer3`` (the official ``ResNet18_MS3`` also runs ``layer4``, whose output no
  loss uses: its parameters get no gradient, so ``torch.optim.SGD`` skips them; running only
  to ``layer3`` is the same step). The teacher is in eval mode under ``no_grad``, the
  student in train mode (BatchNorm2d: momentum 0.1, eps 1e-5, biased batch variance to
  normalise, unbiased into ``running_var``).
- loss: per level ``torch.sum((normalize(t) - normalize(s)) ** 2, 1).mean()`` (mean over
  batch, h, w of the channel sum), summed over levels; no 1/2.
- ``torch.optim.SGD(student.parameters(), 0.4, momentum=0.9, weight_decay=1e-4)``.

Nothing here imports the project except :func:`flax_layout`, which only reuses the
converter's name table to lay torch tensors out as Flax variables for comparison.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
import torchvision

LEVELS = ("layer1", "layer2", "layer3")


def random_resnet18(seed: int, calibrate: bool) -> torch.nn.Module:
    """A torchvision resnet18 with random weights and random BatchNorm affine parameters and
    running statistics (``calibrate``: running stats from a random batch, then perturbed, so
    an eval-mode teacher keeps sane activations)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
            bn.bias.copy_(0.2 * torch.randn(bn.bias.shape, generator=g))
        if calibrate:
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative: the running stats become this batch's
            net.train()
            net(torch.randn(8, 3, 64, 64, generator=g))
            for bn in bns:
                bn.momentum = 0.1
        for bn in bns:
            bn.running_mean.add_(0.3 * torch.randn(bn.running_mean.shape, generator=g)
                                 * bn.running_var.sqrt())
            bn.running_var.mul_(torch.rand(bn.running_var.shape, generator=g) * 1.5 + 0.5)
    return net.eval()


def features(net: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """``layer1..layer3`` outputs (NCHW), as ``ResNet18_MS3`` collects children 4, 5, 6."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    out = []
    for level in LEVELS:
        x = getattr(net, level)(x)
        out.append(x)
    return out


def official_loss(t_feats: Sequence[torch.Tensor], s_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    loss = 0
    for t, s in zip(t_feats, s_feats):
        loss = loss + torch.sum((F.normalize(t, dim=1) - F.normalize(s, dim=1)) ** 2, 1).mean()
    return loss


def anomalib_loss(t_feats: Sequence[torch.Tensor], s_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """anomalib ``STFPMLoss``: per layer ``0.5 / (w h) * MSELoss(reduction="sum")`` of the
    normalised features, summed over layers."""
    layer_losses = []
    for t, s in zip(t_feats, s_feats):
        h, w = t.shape[2:]
        layer_losses.append((0.5 / (w * h)) * F.mse_loss(F.normalize(t), F.normalize(s), reduction="sum"))
    return torch.stack(layer_losses).sum()


class OfficialSTPM:
    """Teacher (eval, frozen) and student (train) with the official optimizer."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, dtype=torch.float64,
                 lr: float = 0.4, momentum: float = 0.9, weight_decay: float = 1e-4):
        self.dtype = dtype
        self.teacher = teacher.to(dtype).eval()
        self.student = student.to(dtype).train()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr, momentum=momentum,
                                         weight_decay=weight_decay)

    def step(self, images_nhwc: np.ndarray) -> float:
        """One official training step on a batch; returns the loss (before the update)."""
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))).to(self.dtype)
        with torch.no_grad():
            t_feats = features(self.teacher, x)
        s_feats = features(self.student, x)
        loss = official_loss(t_feats, s_feats)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.item())


    def round_to_float32(self) -> None:
        """Round the student's parameters, BatchNorm buffers and momentum buffers to float32
        values in place (so a float32 implementation can start from exactly this state)."""
        with torch.no_grad():
            tensors = list(self.student.state_dict().values())
            tensors += [st["momentum_buffer"] for st in self.optimizer.state.values()
                        if st.get("momentum_buffer") is not None]
            for t in tensors:
                if t.is_floating_point():
                    t.copy_(t.float().to(t.dtype))

    def momentum_buffers(self) -> dict[str, torch.Tensor]:
        """SGD momentum buffers by parameter name (after a step: what optax calls the trace)."""
        return {name: self.optimizer.state[p]["momentum_buffer"]
                for name, p in self.student.named_parameters() if p in self.optimizer.state}


def flax_layout(net: torch.nn.Module | Mapping[str, torch.Tensor],
                depth: int = 3) -> dict[str, dict[str, np.ndarray]]:
    """``net``'s state (or a name -> tensor mapping in state-dict names) in this project's Flax
    layout (``{"params", "batch_stats"}``), float64, stages deeper than ``depth`` dropped,
    OIHW kernels -> HWIO; names the mapping lacks are left out."""
    from flax import traverse_util

    from pretrained_conversion import convert_torchvision as ct

    state = net.state_dict() if isinstance(net, torch.nn.Module) else net
    flat = {}
    for key, (path, _) in ct.expected_layout("resnet18").items():
        if key not in state or any(path[1].startswith(f"layer{i}_") for i in range(depth + 1, 5)):
            continue
        arr = state[key].detach().cpu().double().numpy().copy()
        flat[path] = arr.transpose(2, 3, 1, 0) if path[-1] == "kernel" else arr
    return traverse_util.unflatten_dict(flat)
