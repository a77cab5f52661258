"""Pipeline parallelism: the stacked layers split into stages along the `pipeline` mesh axis, and
micro-batches moved between them by collective permutes, all inside the jitted step.

Schedules (`pipeline.schedule`), with S stages, M micro-batches and v virtual stages:

    gpipe        stage s holds layers [s L/S, (s+1) L/S); micro-batch m runs on stage s at
                 iteration m + s. M + S - 1 iterations; bubble (S - 1) / (M + S - 1).
    interleaved  the layers are S v chunks of L / (S v); stage s holds chunks s, s + S, ...,
                 s + (v-1) S, so a micro-batch goes round the ring v times (Megatron's
                 interleaved schedule, MaxText's circular pipeline). Pass r of micro-batch m
                 runs on stage s at iteration r M + m + s: v M + S - 1 iterations, bubble
                 (S - 1) / (v M + S - 1), and v times the point-to-point traffic.

How it is written: one `lax.scan` over iterations whose body runs every stage at once with
`vmap` over a leading stage axis sharded over `pipeline` (so each device computes its own stage)
and then rotates the stage outputs by one (`jnp.roll` along that axis: a collective permute).
Stage 0 reads its input from a [M, ...] buffer that starts as the embedded micro-batches and
receives each pass's output of the last stage, M - S + 1 iterations before stage 0 needs it
again (hence M >= S; we ask for a multiple of S). Stages with nothing to do in the bubble compute
on stale data whose results are never written. JAX differentiates the loop, so the backward is
the mirror schedule and every iteration's activations are kept for it (GPipe's memory: all M
micro-batches in flight; `model.remat` shrinks each to the layer inputs).

The parameters stay stored in layer order, `layers` sharded over `pipeline`: for gpipe each
stage's layers are already on its device; the interleaved layout regroups them inside the step
(an all-to-all of the layer parameters over `pipeline` each step, and of their gradients back).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm.config import ConfigError

@dataclasses.dataclass(frozen=True)
class Pipeline:
    stages: int  # S, the size of the `pipeline` mesh axis
    microbatches: int  # M
    virtual_stages: int = 1  # v; 1 is gpipe

    @property
    def iterations(self) -> int:
        return self.virtual_stages * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """The fraction of stage-iterations that do no useful work."""
        return (self.stages - 1) / self.iterations

    def check(self, num_layers: int, batch: int) -> None:
        s, m, v = self.stages, self.microbatches, self.virtual_stages
        if num_layers % (s * v):
            raise ConfigError(f"pipeline: model.num_layers ({num_layers}) must be divisible by "
                              f"mesh.pipeline x pipeline.virtual_stages ({s} x {v})")
        if m % s:
            raise ConfigError(f"pipeline: pipeline.microbatches ({m}) must be a multiple of "
                              f"mesh.pipeline ({s}): each stage needs a micro-batch per iteration")
        if batch % m:
            raise ConfigError(f"pipeline: the batch ({batch} sequences per step, or per "
                              f"train.microbatches slice) does not split into pipeline."
                              f"microbatches ({m})")


def run(layer_fn: Callable, block_state, x_btd: jax.Array, pipe: Pipeline,
        wrap_stage: Callable = lambda f: f, rows=None) -> jax.Array:
    """Applies all stacked layers to `x_btd` [B, T, D] through the pipeline.

    `layer_fn(x_btd, layer_state, rows) -> (x_btd, None)` is one layer (as scanned by the
    model); `block_state` its parameters stacked along a leading [L] axis; `wrap_stage` wraps one
    stage's work in an iteration (the model's remat: `jax.checkpoint` with its policy); `rows`:
    per-row inputs of the layers ([B, ...] arrays, e.g. BERT's lengths, or None), which travel
    with their micro-batch. Row r of the batch goes to micro-batch r % M (so each device's rows
    stay on it)."""
    s_, m_, v_ = pipe.stages, pipe.microbatches, pipe.virtual_stages
    b, t, d = x_btd.shape
    num_layers = jax.tree.leaves(block_state)[0].shape[0]
    pipe.check(num_layers, b)
    per_chunk = num_layers // (s_ * v_)

    def by_stage(a):  # [L, ...] -> [S, v, L / (S v), ...]: chunk r S + s at [s, r]
        if v_ == 1:  # each stage's layers are already on its device: a local reshape
            return _on_stages(a.reshape(s_, 1, per_chunk, *a.shape[1:]))
        return _on_stages(a.reshape(v_, s_, per_chunk, *a.shape[1:]).swapaxes(0, 1))

    stage_params = jax.tree.map(by_stage, block_state)
    micro_mbtd = split_microbatches(x_btd, m_)
    micro_rows = jax.tree.map(lambda a: split_microbatches(a, m_), rows)

    def stage_fn(params, x_btd, chunk, rows_b):
        # gpipe: a static index, which JAX hoists out of the loop (kept once, not per iteration)
        chunk_params = jax.tree.map(lambda a: a[chunk] if v_ > 1 else a[0], params)
        x_btd, _ = jax.lax.scan(lambda x, p: layer_fn(x, p, rows_b), x_btd, chunk_params)
        return x_btd

    stages = jax.vmap(wrap_stage(stage_fn), spmd_axis_name="pipeline" if _meshed() else None)
    stage_ids = jnp.arange(s_)

    def iteration(carry, it):
        state_sbtd, buffer_mbtd = carry
        i = it - stage_ids  # the work item of each stage: pass i // M of micro-batch i % M
        chunk = jnp.clip(i // m_, 0, v_ - 1)
        first = jax.lax.dynamic_index_in_dim(buffer_mbtd, i[0] % m_, keepdims=False)
        state_sbtd = _on_stages(state_sbtd.at[0].set(first))
        rows_s = jax.tree.map(lambda a: a[i % m_], micro_rows)  # each stage's micro-batch's
        out_sbtd = _on_stages(stages(stage_params, state_sbtd, chunk, rows_s))
        last = i[-1]
        written = jax.lax.dynamic_update_index_in_dim(buffer_mbtd, out_sbtd[-1], last % m_, 0)
        buffer_mbtd = jnp.where((last >= 0) & (last < v_ * m_), written, buffer_mbtd)
        return (jnp.roll(out_sbtd, 1, axis=0), buffer_mbtd), None

    state = _on_stages(jnp.zeros((s_, b // m_, t, d), x_btd.dtype))
    (_, out_mbtd), _ = jax.lax.scan(iteration, (state, micro_mbtd), jnp.arange(pipe.iterations))
    return out_mbtd.swapaxes(0, 1).reshape(b, t, d)


def split_microbatches(x_b: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B / k, ...], row r going to microbatch r % k: when the rows are split
    over the data devices, each device's rows stay on it."""
    b = x_b.shape[0]
    return x_b.reshape(b // k, k, *x_b.shape[1:]).swapaxes(0, 1)


def _meshed() -> bool:
    return "pipeline" in jax.sharding.get_abstract_mesh().axis_names


def _on_stages(a: jax.Array) -> jax.Array:
    """Constrains the leading axis of `a` to the `pipeline` mesh axis, leaving the rest free (a
    no-op outside a mesh: the schedule also runs, unsplit, on one device)."""
    if not _meshed():
        return a
    return jax.lax.with_sharding_constraint(a, P("pipeline", *[P.UNCONSTRAINED] * (a.ndim - 1)))
