"""Device mesh and logical-axis rules: where the model's axis names meet the hardware.

The model names the axes of its parameters (`embed`, `heads`, `mlp`, `vocab`, `layers`, ...) and of
its key activations (`batch`, `length`, `embed`). `RULES` maps each logical name to mesh axes;
`make_mesh` builds the (data, fsdp, tensor, sequence, pipeline) mesh a config asks for. Changing the
parallelism of a run changes these two things, never the model.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.experimental import mesh_utils
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
    ("layers", "pipeline"),  # the stacked layers: contiguous blocks per pipeline stage
    ("positions", None),
    ("norm", None),
)


Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
# The axes of one layer's KV cache (lm.model.init_cache): [batch, kv_heads, length, head_dim],
# the keys of one row and head contiguous, so that a decode step's attention reads each (row,
# head) as one matrix (XLA:CPU transposed the whole cache per layer and step in a [.., length,
# kv_heads, ..] layout: 5-9x slower at batch 8-32). None: not sharded.
KV_CACHE_AXES = ("batch", "kv_heads", None, None)
KV_CACHE_BATCH_AXIS, KV_CACHE_LENGTH_AXIS = 0, 2
ZERO_AXES = ("data", "fsdp")  # ZeRO shards over every data-parallel replica
_TENSOR_NAMES = ("heads", "kv_heads", "mlp", "vocab")
_ALL_NAMES = tuple(name for name, _ in RULES)
REPLICATED: Rules = tuple((name, None) for name in _ALL_NAMES)


@dataclasses.dataclass(frozen=True)
class Layout:
    """What `mesh.rules` decides: where parameters, optimizer state (and master weights) and
    activations live, and whether gradients are reduce-scattered to the optimizer's shards.
    The facts lm.plan's accounting needs are named here too, so the rules string is read once."""
    params: Rules
    opt: Rules
    acts: Rules
    scatter_grads: bool  # zero2, zero3
    gather_params: bool  # zero3, fsdp: parameters gathered in the forward and the backward
    fsdp_only: bool  # fsdp: sharded over the fsdp axis only, replicated over data
    zero3: bool  # parameters sharded over data x fsdp
    tensor_parallel: bool  # tp
    sequence_parallel: bool  # sp


def layout(rules: str) -> Layout:
    """The Layout of `mesh.rules`: presets joined by '+'.

        dp     parameters and optimizer state replicated; the batch over data x fsdp
        zero1  optimizer state (and master weights) sharded over data x fsdp on `embed`
        zero2  zero1, and gradients reduce-scattered to those shards
        zero3  zero2, and parameters sharded the same way (gathered per layer by XLA)
        fsdp   parameters and optimizer state over the fsdp axis only (replicas over data)
        tp     Megatron: heads, kv heads, mlp and vocab over tensor (QKV / MLP-in column-
               parallel, attention-out / MLP-out row-parallel, vocab-parallel embedding/logits)
        sp     the residual stream's sequence dimension over tensor as well as sequence
    """
    parts = set(rules.split("+"))
    params: dict[str, object] = {n: None for n in _ALL_NAMES}
    params["layers"] = "pipeline"  # each pipeline stage holds its layers, whatever the preset
    opt = dict(params)
    acts = dict(RULES)
    if parts & {"zero1", "zero2", "zero3"}:
        opt["embed"] = ZERO_AXES
    if "zero3" in parts:
        params["embed"] = ZERO_AXES
    if "fsdp" in parts:
        params["embed"] = opt["embed"] = "fsdp"
    if "tp" in parts:
        for name in _TENSOR_NAMES:
            params[name] = opt[name] = "tensor"
    else:  # activations follow the parameters: nothing is split over tensor without tp
        for name in _TENSOR_NAMES:
            acts[name] = None
    if "sp" in parts:
        acts["length"] = ("sequence", "tensor")
    return Layout(params=tuple(params.items()), opt=tuple(opt.items()), acts=tuple(acts.items()),
                  scatter_grads=bool(parts & {"zero2", "zero3"}),
                  gather_params=bool(parts & {"zero3", "fsdp"}), fsdp_only="fsdp" in parts,
                  zero3="zero3" in parts, tensor_parallel="tp" in parts,
                  sequence_parallel="sp" in parts)


def check_divisible(abstract_params, shardings, mesh: Mesh) -> None:
    """A clear error when a mesh axis does not divide the dimension it shards."""
    def check(path, leaf, named):
        for dim, (size, axes) in enumerate(zip(leaf.shape, named.spec)):
            ways = devices_along(P(axes), mesh.shape)
            if size % ways:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                raise ConfigError(f"mesh: parameter {name} has size {size} in dimension {dim}, "
                                  f"which mesh axes {axes} ({ways} devices) do not divide; "
                                  "change the mesh, the model size or mesh.rules")
    jax.tree_util.tree_map_with_path(check, abstract_params, shardings)


def logical_names(params):
    """The parameters' logical axis names as written in the model (a tree of PartitionSpecs of
    names), whatever rules are active."""
    with nnx.logical_axis_rules(()):
        return nnx.get_partition_spec(params)


def devices_along(spec: P, shape) -> int:
    """How many devices the mesh axes of `spec` split an array over (`shape`: axis -> size)."""
    return math.prod(shape[a] for axes in spec
                     for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())))


def param_shardings(abstract_params, mesh: Mesh, rules: Rules):
    """NamedShardings for (abstract) parameters from their logical names under `rules`, after
    checking that every sharded dimension divides."""
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_spec(tuple(spec), rules)),
                             logical_names(abstract_params), is_leaf=lambda x: isinstance(x, P))
    check_divisible(abstract_params, shardings, mesh)
    return shardings


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Total size of every mesh axis (ICI x DCN), with a -1 filled; errors name the key."""
    dcn = cfg.dcn_shape()
    nodes = math.prod(dcn.values())
    if num_devices % nodes:
        raise ConfigError(f"mesh: the DCN axes ({dcn}) ask for {nodes} slices, which do not "
                          f"divide the {num_devices} devices")
    ici = resolve_ici_shape(cfg, num_devices // nodes)
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def resolve_ici_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Sizes of the axes within a slice (node), with a -1 filled from `num_devices`."""
    shape = cfg.shape()
    fixed = math.prod(s for s in shape.values() if s != -1)
    fill = [a for a, s in shape.items() if s == -1]
    if fill:
        if num_devices % fixed:
            raise ConfigError(f"mesh: the fixed axes ({fixed} devices) do not divide the "
                              f"{num_devices} available devices, so 'mesh.{fill[0]}=-1' "
                              "cannot fill")
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
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    dcn = cfg.dcn_shape()
    if math.prod(dcn.values()) > 1:
        # Hybrid: the DCN axes step across slices (one per process, i.e. per node or host), so
        # only data / fsdp / pipeline traffic crosses the slow links.
        nodes = math.prod(dcn.values())
        ici = resolve_ici_shape(cfg, len(devices) // nodes)
        grid = mesh_utils.create_hybrid_device_mesh(
            tuple(ici[a] for a in MESH_AXES), tuple(dcn[a] for a in MESH_AXES), devices,
            process_is_granule=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
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


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, length] token array (or of a [batch] one, `ndim` 1, or of any
    rank): rows over data x fsdp."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), RULES))
