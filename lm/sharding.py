"""Device mesh and logical-axis rules: where the model's axis names meet the hardware.

The model names the axes of its parameters (`embed`, `heads`, `mlp`, `vocab`, `layers`, ...) and of
its key activations (`batch`, `length`, `embed`). `RULES` maps each logical name to mesh axes;
`make_mesh` builds the (data, fsdp, tensor, sequence, pipeline) mesh a config asks for. Changing the
parallelism of a run changes these two things, never the model.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lm.config import MESH_AXES, ConfigError, MeshConfig

# Logical name -> mesh axes. Every name the model uses appears here (None = replicated), because
# Flax passes unknown names through to the PartitionSpec.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("positions", None),
    ("norm", None),
)


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Sizes for every mesh axis, with a -1 filled from `num_devices`; errors name the key."""
    shape = cfg.shape()
    fixed = math.prod(s for s in shape.values() if s != -1)
    fill = [a for a, s in shape.items() if s == -1]
    if fill:
        if num_devices % fixed:
            raise ConfigError(f"mesh: the fixed axes ({fixed} devices) do not divide the "
                              f"{num_devices} available devices, so 'mesh.{fill[0]}=-1' cannot fill")
        shape[fill[0]] = num_devices // fixed
    if math.prod(shape.values()) != num_devices:
        raise ConfigError(f"mesh: {shape} uses {math.prod(shape.values())} devices but "
                          f"{num_devices} are available; set one axis to -1 or fix the sizes")
    return shape


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with Auto axis types (GSPMD propagation)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(cfg, len(devices))
    sizes = tuple(shape[a] for a in MESH_AXES)
    if devices == jax.devices():
        return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None], rules=None) -> P:
    """PartitionSpec for logical axis names under `rules` (default: the active Flax rules).

    A mesh axis shards at most one dimension: the first dimension that claims it keeps it. So
    `embed` activations are replicated when `batch` already uses `fsdp`, while `embed` weights
    (which have no batch dimension) are sharded over it.
    """
    table = dict(rules if rules is not None else flax_spmd.get_logical_axis_rules())
    used: set[str] = set()
    spec = []
    for name in names:
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrains activation `x` to the mesh axes its logical `names` map to.

    A no-op outside a mesh or without rules, so the model also runs single-device, un-meshed.
    """
    mesh = jax.sharding.get_abstract_mesh()
    rules = flax_spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [batch, length] token array: rows over data x fsdp."""
    return NamedSharding(mesh, logical_to_spec(("batch", None), RULES))
