"""Arrays of many jobs at once: the job axis over ``model``, each job's batch over ``data``.

A group of ``J`` jobs runs as ``Jp`` slots (``J`` padded to a multiple of the ``model``
axis; padding slots are never active). Values per job are stacked on a leading axis; each
process builds the global arrays from the slots and rows its own devices hold, so a host
reads only the images of its (job, data shard) pairs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rstpm_jax import sharding


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the slots of a group live: ``mesh`` (model x data), ``slots`` = padded job count,
    ``batch`` = one job's global batch."""

    mesh: Mesh
    slots: int
    batch: int

    @property
    def model(self) -> int:
        return self.mesh.shape[sharding.MODEL_AXIS]

    @property
    def data(self) -> int:
        return self.mesh.shape[sharding.DATA_AXIS]

    def local_rows(self) -> dict[int, tuple[int, int]]:
        """``{slot: (lo, hi)}``: the rows of each slot's batch that this process's devices hold."""
        spec = sharding.job_batch_sharding(self.mesh)
        rows: dict[int, list[tuple[int, int]]] = {}
        for index in spec.addressable_devices_indices_map((self.slots, self.batch)).values():
            slots, rs = index
            lo, hi = rs.indices(self.batch)[:2]
            for s in range(*slots.indices(self.slots)[:2]):
                rows.setdefault(s, []).append((lo, hi))
        out = {}
        for s, spans in rows.items():
            lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
            covered = sum(b - a for a, b in set(spans))
            if covered != hi - lo:
                raise ValueError(f"slot {s}: this host's rows {sorted(set(spans))} are not contiguous.")
            out[s] = (lo, hi)
        return out


def make_layout(num_jobs: int, batch: int, mesh_cfg: Any) -> Layout:
    """The layout ``mesh.model`` / ``mesh.data`` (``auto`` or counts) give ``num_jobs`` jobs."""
    model, data = sharding.plan_mesh(num_jobs, batch, mesh_cfg.get("data", "auto"),
                                     mesh_cfg.get("model", "auto"))
    return Layout(sharding.make_job_mesh(model, data), -(-num_jobs // model) * model, batch)


def stack(trees: list[Any]) -> Any:
    """Host trees of one structure -> one tree of stacked NumPy arrays."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def put_slots(stacked: Any, layout: Layout) -> Any:
    """Stacked host values (leading axis = slots) -> global arrays with the slot axis on ``model``."""
    spec = sharding.job_sharding(layout.mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, spec, lambda i, x=x: x[i]),
                        stacked)


def put_batches(local: dict[int, Any], like: Any, layout: Layout) -> Any:
    """Per-slot host batches (``{slot: tree}`` with this host's rows of each) -> global arrays
    ``[slots, batch, ...]``. ``like``: a tree of one full-batch example's shapes and dtypes;
    slots this host holds but ``local`` lacks get zeros."""
    spec = sharding.job_batch_sharding(layout.mesh)
    rows = layout.local_rows()
    leaves, treedef = jax.tree.flatten(like)
    per_slot = {s: treedef.flatten_up_to(t) for s, t in local.items()}

    def build(k: int, leaf: jax.ShapeDtypeStruct):
        shape = (layout.slots, layout.batch, *leaf.shape[1:])

        def callback(index):
            slots, rs = index[0], index[1]
            out = []
            for s in range(*slots.indices(layout.slots)[:2]):
                lo = rows[s][0]
                a, b = rs.indices(layout.batch)[:2]
                if s in per_slot:
                    out.append(np.asarray(per_slot[s][k])[a - lo:b - lo])
                else:
                    out.append(np.zeros((b - a, *leaf.shape[1:]), leaf.dtype))
            return np.stack(out)[(slice(None), slice(None), *index[2:])]

        return jax.make_array_from_callback(shape, spec, callback)

    return treedef.unflatten([build(k, leaf) for k, leaf in enumerate(leaves)])


@functools.lru_cache(maxsize=64)
def _take(mesh: Mesh, slot: int) -> Callable:
    return jax.jit(lambda tree: jax.tree.map(lambda x: x[slot], tree),
                   out_shardings=NamedSharding(mesh, P()))


def take(tree: Any, slot: int, layout: Layout) -> Any:
    """One slot of stacked global arrays, replicated over the layout's devices."""
    return _take(layout.mesh, slot)(tree)


def host_copy(tree: Any) -> Any:
    """A replicated (or fully addressable) tree as NumPy on this host."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), tree)
