"""`python -m lm.train --config configs/NAME.py[:ARG] --workdir DIR [--config.a.b=VALUE ...]`

The training entry point, the same command on every host. It validates the config into frozen
dataclasses, builds the mesh, creates the `TrainState` (parameters, optimizer state, optional
master weights, loss scale, step) already sharded (a jitted constructor with out_shardings from
the logical axis names), then runs the jitted `train_step` once per batch: forward,
cross-entropy, backward, optimizer update. Metrics (loss, speed, MFU: SPEED_METRICS) go to
DIR/metrics.jsonl, DIR/tb and the progress bar; a profiler trace of train.profile_steps to DIR/tb;
the state to DIR/checkpoints (orbax); a generated sample ends the run.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags
from jax.sharding import NamedSharding, PartitionSpec as P

from lm import distributed, finetune, generate, hardware, plan, sharding, sparsity
from lm.checkpoint import Checkpointer, load_params, merge_params
from lm import tasks
from lm.config import ConfigError, RunConfig, TaskConfig, from_config_dict
from lm.data.corpus import prepare_stdlib
from lm.data.dataset import Dataset
from lm.data.prepare import PrepareError
from lm.data.loader import BertLoader, Loader, LoaderState
from lm.data.tokenizer import DATA_FILE
from lm.model import Transformer, abstract_model, param_count
from lm.pipeline import Pipeline, split_microbatches
from lm.optim import LossScale, all_finite, make_optimizer, schedule
from lm.tasks import Masking, xent
from lm.tracking import Tracker


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """What a train step changes and a checkpoint holds (a pytree: jit, shardings and orbax see
    its fields by name)."""
    step: jax.Array  # int32: steps taken, skipped ones included
    params: Any  # the model's nnx.State, in precision.param_dtype
    opt_state: Any  # the optimizer's, over `master` when kept
    loss_scale: dict[str, jax.Array]  # LossScale's scalars
    master: Any = None  # precision.master_weights: float32 parameters; `params` their rounding


@dataclasses.dataclass(frozen=True)
class StepParts:
    """The fixed pieces that the train and eval steps are built from (bound once by `build`)."""
    graphdef: Any
    tx: optax.GradientTransformation
    scaler: LossScale
    layout: sharding.Layout
    pipeline: Pipeline | None
    microbatches: int
    micro_sharding: NamedSharding  # of a [microbatches, B / microbatches, T] batch
    grad_sharding: Any  # zero2/zero3: the optimizer state's shards, else None (kept as is)
    skip_nonfinite_updates: bool  # a step with non-finite gradients changes only the loss scale
    task: TaskConfig = TaskConfig()
    masking: Masking | None = None  # masked-LM tasks: the ids mask_batch needs
    seed: int = 0  # train.seed: the masks' keys
    sparse: bool = False  # train.sparsity 2:4: the layer matmuls keep their 2:4 masks


@dataclasses.dataclass
class Trainer:
    """The jitted functions and shardings of one run; built once, before the loop."""
    graphdef: Any
    state_sharding: TrainState
    init: Any        # () -> TrainState
    init_from_params: Any  # params -> TrainState (fresh optimizer state around given parameters)
    train_step: Any  # (state, batch) -> (state, metrics)
    eval_step: Any   # (params, batch, index) -> sums (`eval_sums`); fine-tuning: (params,
    #                  batch) -> the head's outputs (lm.finetune.head_outputs), replicated
    prune: Any = None  # state -> state 2:4-pruned (`prune_state`; train.sparsity)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state (for restoring onto this mesh)."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            jax.eval_shape(self.init), self.state_sharding)


def loss_fn(graphdef, params, batch, pipeline: Pipeline | None = None,
            norm: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """(objective, metrics): the mean next-token cross-entropy (float32) of a [B, T + 1] batch,
    or for a masked-LM batch (a dict, lm.tasks) the summed cross-entropy of its predicted tokens
    divided by `norm` (the step's predicted tokens per microbatch, so that the microbatches'
    mean is the step's mean), plus the next-sentence loss where the batch has its labels.
    metrics: `loss` (the masked-LM part) and `nsp_loss`."""
    model = nnx.merge(graphdef, params)
    if isinstance(batch, dict) and "mlm_weights" not in batch:  # a fine-tuning head's rows
        loss = finetune.head_loss(finetune.head_outputs(model, batch, pipeline), batch)
        return loss, {"loss": loss}
    if isinstance(batch, dict):
        x_btd = model.hidden(batch["tokens"], pipeline=pipeline, **tasks.encoder_inputs(batch))
        mlm_sum, _ = _head_sums(model, x_btd, batch, pipeline)
        metrics = {"loss": mlm_sum / norm}
        if "nsp_labels" in batch:
            metrics["nsp_loss"], _ = tasks.nsp_terms(model.nsp_logits(x_btd), batch)
        return sum(metrics.values()), metrics
    if pipeline is None:
        loss = xent(model(batch[:, :-1]), batch[:, 1:]).mean()
        return loss, {"loss": loss}
    if pipeline.schedule == "1f1b":  # the head runs inside the schedule, per micro-batch
        total, _ = model.pipelined_sums(batch[:, :-1], lambda m, x_btd, next_bt: (
            xent(m.logits(x_btd), next_bt).sum(), jnp.zeros(())), batch[:, 1:], pipeline)
        return (loss := total / (batch.shape[0] * (batch.shape[1] - 1))), {"loss": loss}
    x_btd = model.hidden(batch[:, :-1], pipeline=pipeline)
    total, _ = _head_sums(model, x_btd, {"next": batch[:, 1:]}, pipeline)
    loss = total / (batch.shape[0] * (batch.shape[1] - 1))
    return loss, {"loss": loss}


def _head_sums(model, x_btd, batch: dict, pipeline: Pipeline | None):
    """(summed cross-entropy, right predictions) of the output layer on `x_btd`: of the next
    tokens (`batch["next"]` [B, T]) or of a masked-LM batch's predicted tokens. With a
    pipeline, one pipeline micro-batch at a time (checkpointed), so the logits of the whole
    batch never exist at once."""
    def sums(x_btd, batch):
        if "next" in batch:
            return xent(model.logits(x_btd), batch["next"]).sum(), jnp.zeros(())
        return tasks.mlm_sums(model.logits(x_btd, batch["mlm_positions"]), batch)

    if pipeline is None:
        return sums(x_btd, batch)
    m = pipeline.microbatches
    chunk = jax.checkpoint(sums)
    parts = jax.tree.map(lambda a: split_microbatches(a, m), (x_btd, batch))
    zeros = (jnp.zeros((), jnp.float32),) * 2
    total, _ = jax.lax.scan(lambda acc, xb: (jax.tree.map(jnp.add, acc, chunk(*xb)), None),
                            zeros, parts)
    return total


def _to_f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def new_state(params, tx: optax.GradientTransformation, scaler: LossScale,
              master_weights: bool) -> TrainState:
    """Step 0 around `params`: fresh optimizer and loss-scale state (and float32 masters)."""
    master = _to_f32(params) if master_weights else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params if master is None else master),
                      loss_scale=scaler.init(), master=master)


def mean_loss_and_grads(parts: StepParts, params, batch, scale) -> tuple[dict, Any]:
    """The loss metrics (`loss_fn`'s) and the objective's float32 gradients (unscaled).
    Gradients stay in the parameter dtype until reduced (ZeRO's accounting: 2 bytes per
    parameter in fp16); microbatches are a scan that sums them into float32, sharded like the
    optimizer state under zero2/zero3."""
    k = parts.microbatches
    norm = (jnp.maximum(batch["mlm_weights"].sum(), 1.0) / k if "mlm_weights" in batch
            else None) if isinstance(batch, dict) else None  # predicted tokens per microbatch

    def scaled_loss(p, b):
        objective, metrics = loss_fn(parts.graphdef, p, b, parts.pipeline, norm)
        return objective * scale, metrics

    scaled = jax.value_and_grad(scaled_loss, has_aux=True)
    reduce = (lambda g: g) if parts.grad_sharding is None else (
        lambda g: jax.lax.with_sharding_constraint(g, parts.grad_sharding))  # reduce-scatter
    if k == 1:
        (_, metrics), grads = scaled(params, batch)
        grads = _to_f32(reduce(grads))
    else:
        def accumulate(carry, micro):
            (_, metrics), grads = scaled(params, micro)
            return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), carry,
                                (metrics, reduce(grads))), None

        names = ("loss", "nsp_loss") if isinstance(batch, dict) and "nsp_labels" in batch else \
            ("loss",)
        zeros = ({n: jnp.zeros((), jnp.float32) for n in names},
                 reduce(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)))
        (metrics, grads), _ = jax.lax.scan(accumulate, zeros, _microbatches(parts, batch))
        metrics, grads = jax.tree.map(lambda x: x / k, (metrics, grads))
    return metrics, jax.tree.map(lambda g: g / scale, grads)


def _microbatches(parts: StepParts, batch):
    """[K, B / K, ...] of each batch array, each microbatch's rows split over the data devices
    as the batch is."""
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(
        split_microbatches(a, parts.microbatches), parts.micro_sharding), batch)


def apply_update(tx: optax.GradientTransformation, state: TrainState, grads, masks=None):
    """(params, opt_state, master) after one optimizer update with float32 `grads`; `masks`
    (2:4 sparsity, lm.sparsity.mask): the updated weights are masked again (an optimizer that
    moves zero-gradient entries, weight decay or LAMB's ratios, cannot revive pruned ones)."""
    keep = (lambda w: w) if masks is None else functools.partial(sparsity.constrain, masks)
    if state.master is not None:
        updates, opt_state = tx.update(grads, state.opt_state, state.master)
        master = keep(optax.apply_updates(state.master, updates))
        return jax.tree.map(lambda m, p: m.astype(p.dtype), master, state.params), opt_state, master
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return keep(optax.apply_updates(state.params, updates)), opt_state, None


def prune_state(tx: optax.GradientTransformation, state: TrainState) -> TrainState:
    """2:4 sparsity's start (train.sparsity): the layer matmul weights pruned to the 2 largest
    of each 4 along their input axes (lm.sparsity.prune; of the float32 masters where kept),
    and the optimizer state's entries at the pruned positions (its moments) zeroed. The masks
    are the weights' own non-zeros from then on, so on a resumed sparse run's state this
    changes nothing."""
    masks = sparsity.mask(state.params if state.master is None else state.master)
    master = None if state.master is None else sparsity.constrain(masks, state.master)
    params = (sparsity.constrain(masks, state.params) if master is None else
              jax.tree.map(lambda m, p: m.astype(p.dtype), master, state.params))
    opt_state = optax.tree_map_params(tx, lambda x, m: sparsity.apply(m, x), state.opt_state,
                                      masks)
    return dataclasses.replace(state, params=params, opt_state=opt_state, master=master)


def train_step(parts: StepParts, state: TrainState, batch) -> tuple[TrainState, dict]:
    """One optimizer step on a [B, T + 1] batch (or a masked-LM task's dict, masked here with
    the step's key); returns the new state and its metrics."""
    if parts.masking is not None:
        batch = tasks.mask_batch(batch, tasks.step_key(parts.seed, state.step, 1), parts.task,
                                 parts.masking)
    with nnx.logical_axis_rules(parts.layout.acts):  # the model's activation constraints
        loss_metrics, grads = mean_loss_and_grads(parts, state.params, batch,
                                                  state.loss_scale["scale"])
        masks = None
        if parts.sparse:
            # 2:4: the masks are the weights' own non-zeros (lm.sparsity: pruned at the start,
            # no kept entry ever exactly 0), so a checkpoint needs no extra state. Every path
            # (microbatches, loss scaling, skipped steps) meets here with the final, unscaled
            # gradients: masked before the optimizer, its moments of pruned entries stay 0.
            masks = sparsity.mask(state.params if state.master is None else state.master)
            grads = sparsity.apply(masks, grads)
        with jax.named_scope("optimizer"):
            updated = apply_update(parts.tx, state, grads, masks)
    loss_scale = state.loss_scale
    if parts.skip_nonfinite_updates:
        finite = all_finite(grads)
        old = (state.params, state.opt_state, state.master)
        updated = jax.tree.map(lambda n, o: jnp.where(finite, n, o), updated, old)
        loss_scale = parts.scaler.update(state.loss_scale, finite)
    params, opt_state, master = updated
    metrics = loss_metrics | {"grad_norm": optax.tree.norm(grads),
               "loss_scale": state.loss_scale["scale"], "skipped_steps": loss_scale["skipped"]}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      loss_scale=loss_scale, master=master), metrics


def eval_step(parts: StepParts, params, batch, index) -> dict[str, jax.Array]:
    """Sums over one batch that `_evaluator` adds up: the next-token loss (`loss`, per
    `count` = 1 batch), or for a masked-LM task (masked by eval batch `index`'s key, the same
    masks at every evaluation) the predicted tokens' summed loss, their `count`, how many are
    right, and with NSP the rows and how many are right. In the same microbatches as training
    (the same peak memory)."""
    if parts.masking is not None:
        batch = tasks.mask_batch(batch, tasks.step_key(parts.seed, index, 2), parts.task,
                                 parts.masking)
    with nnx.logical_axis_rules(parts.layout.acts):
        sums = lambda b: _eval_sums(parts, params, b)
        if parts.microbatches == 1:
            out = sums(batch)
        else:
            out = jax.tree.map(lambda x: x.sum(0), jax.lax.map(sums, _microbatches(parts, batch)))
    if parts.masking is None:  # a mean over the microbatches' means
        out = {"loss": out["loss"] / parts.microbatches, "count": jnp.ones(())}
    return out


def head_eval_step(parts: StepParts, params, batch) -> dict[str, jax.Array]:
    """A fine-tuning head's outputs on one eval batch (lm.finetune.evaluate scores them)."""
    with nnx.logical_axis_rules(parts.layout.acts):
        return finetune.head_outputs(nnx.merge(parts.graphdef, params), batch, parts.pipeline)


def _eval_sums(parts: StepParts, params, batch) -> dict[str, jax.Array]:
    if not isinstance(batch, dict):
        return {"loss": loss_fn(parts.graphdef, params, batch, parts.pipeline)[0]}
    model = nnx.merge(parts.graphdef, params)
    x_btd = model.hidden(batch["tokens"], pipeline=parts.pipeline, **tasks.encoder_inputs(batch))
    loss, right = _head_sums(model, x_btd, batch, parts.pipeline)
    out = {"loss": loss, "count": batch["mlm_weights"].sum(), "mlm_right": right}
    if "nsp_labels" in batch:
        _, out["nsp_right"] = tasks.nsp_terms(model.nsp_logits(x_btd), batch)
        out["rows"] = jnp.asarray(batch["nsp_labels"].shape[0], jnp.float32)
    return out


def build(run: RunConfig, mesh: jax.sharding.Mesh, masking: Masking | None = None) -> Trainer:
    """Traces nothing yet: works out shapes and shardings abstractly and wraps the jits.
    `masking`: a masked-LM task's token ids (default: lm's WordPiece layout, `Masking`)."""
    pipe = _pipeline(run, mesh)  # its layout errors first: they say more than a sharding's
    tx = make_optimizer(run.optim, run.train.steps, run.train.phase_start)
    scaler = LossScale(run.precision, run.precision.dynamic)
    lay = sharding.layout(run.mesh.rules)
    with jax.set_mesh(mesh):
        graphdef, abs_params = abstract_model(run.model, run.precision, run.task)
    opt_param_sharding = sharding.param_shardings(abs_params, mesh, lay.opt)
    state_sharding = _state_shardings(run, mesh, lay, tx, scaler, abs_params,
                                      opt_param_sharding)
    replicated = NamedSharding(mesh, P())
    batch_axes = sharding.batch_sharding(mesh).spec[0]
    parts = StepParts(
        graphdef=graphdef, tx=tx, scaler=scaler, layout=lay, pipeline=pipe,
        microbatches=run.train.microbatches,
        micro_sharding=NamedSharding(mesh, P(None, batch_axes)),
        grad_sharding=opt_param_sharding if lay.scatter_grads else None,
        skip_nonfinite_updates=scaler.dynamic or run.train.skip_nonfinite,
        task=run.task, seed=run.train.seed,
        masking=(masking or Masking(run.model.vocab_size)) if run.task.masked else None,
        sparse=run.train.sparsity == "2:4")
    fresh = functools.partial(new_state, tx=tx, scaler=scaler,
                              master_weights=run.precision.master_weights)
    make_params = lambda: nnx.state(Transformer(run.model, run.precision, run.task,
                                                rngs=nnx.Rngs(params=run.train.seed)))
    return Trainer(
        graphdef=graphdef, state_sharding=state_sharding,
        init=jax.jit(lambda: fresh(make_params()), out_shardings=state_sharding),
        init_from_params=jax.jit(fresh, out_shardings=state_sharding),
        train_step=jax.jit(functools.partial(train_step, parts), donate_argnums=(0,),
                           out_shardings=(state_sharding, replicated)),
        eval_step=(jax.jit(functools.partial(head_eval_step, parts), out_shardings=replicated)
                   if run.task.finetune else jax.jit(functools.partial(eval_step, parts))),
        prune=jax.jit(functools.partial(prune_state, tx), donate_argnums=(0,),
                      out_shardings=state_sharding),
    )


def _state_shardings(run: RunConfig, mesh, lay: sharding.Layout, tx, scaler, abs_params,
                     opt_param_sharding) -> TrainState:
    """Where each part of the state lives under `mesh.rules`: parameters by lay.params, the
    optimizer state (and master weights) by lay.opt (`opt_param_sharding`), scalars
    replicated."""
    replicated = NamedSharding(mesh, P())
    abstract = jax.eval_shape(lambda p: new_state(p, tx, scaler, run.precision.master_weights),
                              abs_params)
    return TrainState(
        step=replicated, params=sharding.param_shardings(abs_params, mesh, lay.params),
        opt_state=optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state,
                                        opt_param_sharding,
                                        transform_non_params=lambda _: replicated),
        loss_scale=jax.tree.map(lambda _: replicated, abstract.loss_scale),
        master=opt_param_sharding if run.precision.master_weights else None)


def _pipeline(run: RunConfig, mesh: jax.sharding.Mesh) -> Pipeline | None:
    """The pipeline schedule of `run` on `mesh` (None without a `pipeline` axis), checked."""
    stages = mesh.shape["pipeline"]
    if stages == 1:
        return None
    pp, t = run.pipeline, run.train
    pipe = Pipeline(stages, pp.microbatches, pp.virtual_stages, pp.schedule)
    if pp.schedule == "1f1b" and run.task.name != "lm":
        raise ConfigError(f"pipeline.schedule '1f1b' trains task.name 'lm' so far (this run: "
                          f"{run.task.name!r}); use 'gpipe' or 'interleaved'")
    step_batch = t.batch_size // t.microbatches
    pipe.check(run.model.num_layers, step_batch)
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if (step_batch // pp.microbatches) % data_ways:
        raise ConfigError(f"pipeline: each pipeline micro-batch ({step_batch} / "
                          f"{pp.microbatches} sequences) must split over mesh.data x mesh.fsdp "
                          f"({data_ways}); change train.batch_size or pipeline.microbatches")
    return pipe


class TrainingStopped(Exception):
    """The run cannot go on (a non-finite loss); the last good checkpoint is kept."""


def train(run: RunConfig, workdir: str) -> TrainState:
    """Runs `run` to completion in `workdir`, resuming from its latest complete checkpoint;
    returns the final state (sharded arrays). SIGTERM / SIGINT save a checkpoint at the next
    step boundary and return early."""
    if run.model.quantized != "none":
        raise ConfigError(f"model.quantized is {run.model.quantized!r}: an int8 checkpoint "
                          "(lm.quantize) is for inference; train or fine-tune its float "
                          "checkpoint")
    workdir = os.path.abspath(workdir)
    _check_writable(workdir)
    mesh = sharding.make_mesh(run.mesh)
    _check_batch_splits(run, mesh)
    ckpt = Checkpointer(workdir, keep=run.checkpoint.keep, keep_every=run.checkpoint.keep_every,
                        async_save=run.checkpoint.async_save)
    notes = []  # said once the tracker exists
    if run.task.finetune:  # labelled rows; the model section may come from train.init_from
        run, dataset = finetune.prepare(run, notes.append)
    else:
        dataset = open_dataset(run, workdir)
    train_data, eval_data = _loaders(run, dataset, mesh)
    _record_data(workdir, dataset)
    tracker = Tracker(workdir, run.train.steps, progress=run.train.progress)
    for note in notes:
        tracker.write(note)
    tracker.log_hparams(run.to_dict(), workdir)
    profiler = _Profiler(run.train.profile_window, os.path.join(workdir, "tb"))
    # build() sets mesh.rules inside its jits; leaving the block ends a trace still running.
    with jax.set_mesh(mesh), _StopRequest() as stop, profiler:
        trainer = build(run, mesh, _masking(run, dataset))
        start, state = _initial_state(run, trainer, ckpt, train_data, tracker)
        if run.train.sparsity == "2:4":  # a no-op on a resumed sparse run's state
            state = trainer.prune(state)
            tracker.write("train.sparsity 2:4: the layer matmul weights keep the 2 largest of "
                          "each 4 along their inputs (a resumed sparse run's already do)")
        tracker.write(f"{param_count(state.params):,} parameters, mesh {dict(mesh.shape)}, "
                      f"{dataset.num_tokens('train'):,} train tokens "
                      f"({train_data.num_sequences:,} sequences) from {dataset.path}" +
                      (f"; resumed from step {start}" if start else ""))
        saver = _Saver(run, ckpt, train_data, state)
        evaluate = (_head_evaluator(run, trainer, eval_data, dataset, tracker)
                    if run.task.finetune else _evaluator(run, trainer, eval_data, tracker))
        state = _loop(run, trainer, state, start, train_data, tracker, saver, evaluate, stop,
                      profiler)
        train_data.close()
        ckpt.close()
    tracker.finish()
    if not stop.name and run.train.sample_tokens and run.task.name == "lm":
        _print_sample(run, trainer, state, dataset.tokenizer, mesh)
    return state


def _loop(run: RunConfig, trainer: Trainer, state: TrainState, start: int, train_data: Loader,
          tracker: Tracker, saver: "_Saver", evaluate, stop: "_StopRequest",
          profiler: "_Profiler") -> TrainState:
    """Steps start + 1 .. train.steps: log, evaluate, checkpoint, profile, and stop on request.
    A step's loss is checked once the next step is queued, so the check does not stall the
    device."""
    t = run.train
    lr = schedule(run.optim, t.steps, t.phase_start)
    tracker.advance(start)
    timer = _Throughput.of(run, jax.device_count())
    previous = None  # (step, metrics) of the step before
    step = start
    for step in range(start + 1, t.steps + 1):
        profiler.before(step)
        state, metrics = trainer.train_step(state, next(train_data))
        if previous is not None:
            saver.check(*previous)
        previous = (step, metrics)
        timer.tick(metrics)
        if step % t.log_every == 0 or step == t.steps:
            host = jax.device_get(metrics)  # waits for the step: the timer's window ends here
            skipped = int(host["skipped_steps"])  # the schedule follows the optimizer's count
            tracker.log(step, {k: float(v) for k, v in host.items()} | {
                "lr": float(lr(step - 1 - skipped)), "skipped_steps": skipped} | timer.window())
        if profiler.after(step, metrics):
            tracker.write(f"step {step}: profiled steps {profiler.traced} into "
                          f"{profiler.log_dir} (TensorBoard's profile tab)")
            timer.restart()  # don't bill writing the trace to training
        if step % t.eval_every == 0 or step == t.steps:
            saver.check(step, metrics)
            evaluate(step, state.params)
            timer.restart()  # nor evaluation
        if run.checkpoint.every and step % run.checkpoint.every == 0:
            saver.save(step, state, metrics)
        tracker.advance(step)
        if stop.agreed(step):
            saver.save(step, state, metrics)
            tracker.write(f"received {stop.name}: saved step {step} in "
                          f"{saver.ckpt.directory}; run the same command to resume")
            return state
    if previous is not None:
        saver.save(step, state, previous[1])
    return state


# Logged every train.log_every steps: tokens per second, mean seconds per step, model FLOP/s
# per device (lm.plan's 6N + 12LTd per token), the same counting remat's recomputation, and
# their fractions of the device's datasheet peak (lm.hardware): MFU and HFU, None where the
# peak is unknown (CPUs).
SPEED_METRICS = ("tokens_per_s", "step_time_s", "tflops_per_device",
                 "tflops_per_device_with_recompute", "mfu", "hfu")


class _Throughput:
    """SPEED_METRICS over the steps since the last `window()`, not counting the first step (it
    compiles), evaluation or writing a trace (`restart`)."""

    def __init__(self, tokens_per_step: int, flops: float, flops_with_recompute: float,
                 devices: int, peak: float | None):
        self.tokens_per_step, self.devices, self.peak = tokens_per_step, devices, peak
        self.flops, self.flops_with_recompute = flops, flops_with_recompute
        self.start, self.steps = None, 0

    @classmethod
    def of(cls, run: RunConfig, devices: int) -> "_Throughput":
        """For `run` on `devices`: lm.plan's model FLOPs per step (without and with remat's
        recomputation), this machine's datasheet peak (lm.hardware; None on CPUs)."""
        cost = plan.plan(run, devices)
        peak = hardware.peak_flops(hardware.this_device_kind(), run.precision.compute_dtype)
        return cls(run.train.batch_size * run.train.seq_len, cost["flops_per_step"],
                   cost["flops_with_recompute"], devices, peak)

    def tick(self, metrics) -> None:
        if self.start is None:  # count from the end of the first step
            jax.block_until_ready(metrics)
            return self.restart()
        self.steps += 1

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def window(self) -> dict[str, float | None]:
        """The window's SPEED_METRICS (call once its steps are done); starts a new one. A window
        without steps (the first, with train.log_every=1) has tokens_per_s 0, the rest None."""
        steps, elapsed = self.steps, time.perf_counter() - self.start
        self.restart()
        if not steps:
            return dict.fromkeys(SPEED_METRICS) | {"tokens_per_s": 0.0}
        step_time = elapsed / steps
        model, with_recompute = (f / self.devices / step_time
                                 for f in (self.flops, self.flops_with_recompute))
        of_peak = lambda rate: None if self.peak is None else rate / self.peak
        return dict(zip(SPEED_METRICS, (
            self.tokens_per_step / step_time, step_time, model / 1e12, with_recompute / 1e12,
            of_peak(model), of_peak(with_recompute))))


class _Profiler:
    """train.profile_steps: a jax.profiler trace of steps START..STOP into WORKDIR/tb, where
    TensorBoard's profile tab finds it (tb/plugins/profile/RUN/HOST.xplane.pb; every process
    traces its own devices). A run resumed past STOP traces nothing, one resumed inside the
    window the rest of it; leaving the context (a stop request, an error, a run that ends
    before STOP) ends the trace."""

    def __init__(self, window: tuple[int, int] | None, log_dir: str):
        self.window, self.log_dir = window, log_dir
        self.first, self.tracing = None, False  # the first traced step

    def before(self, step: int) -> None:
        """Starts the trace before the window's first step (of those this run takes)."""
        if self.window and not self.tracing and self.window[0] <= step <= self.window[1]:
            jax.profiler.start_trace(self.log_dir)
            self.first, self.tracing = step, True

    def after(self, step: int, metrics) -> bool:
        """Ends the trace once step STOP has run (waits for it); whether it did."""
        if not self.tracing or step < self.window[1]:
            return False
        jax.block_until_ready(metrics)
        self._stop()
        return True

    @property
    def traced(self) -> str:
        return f"{self.first}-{self.window[1]}"

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.tracing = False

    def __enter__(self) -> "_Profiler":
        return self

    def __exit__(self, *exc) -> bool:
        if self.tracing:
            self._stop()
        return False


class _Saver:
    """Saves each step at most once, and names as good only a checkpoint whose own loss was seen
    finite. A step's loss is that of the parameters *before* its update, so `check(step)` judges
    the state of step - 1: a non-finite loss (train.skip_nonfinite off, no dynamic loss scaling)
    or train.max_skipped_steps consecutive skipped steps stop the run, and the checkpoints from
    the first bad state on are moved aside as STEP.nonfinite, so that the same command resumes
    from a good one."""

    def __init__(self, run: RunConfig, ckpt: Checkpointer, train_data: Loader, state: TrainState):
        self.run, self.ckpt, self.train_data = run, ckpt, train_data
        self.stop_on_nonfinite = not (run.train.skip_nonfinite or run.precision.dynamic)
        self.max_skipped = 0 if self.stop_on_nonfinite else run.train.max_skipped_steps
        self.saved = set(ckpt.all_steps())
        self.checked = int(jax.device_get(state.step))  # the last step check() has seen
        self.skipped = int(jax.device_get(state.loss_scale["skipped"]))  # total so far
        self.skipping_since = None  # the first of the current consecutive skipped steps

    def check(self, step: int, metrics: dict) -> None:
        """Judges step's metrics (once; waits for that step)."""
        if step <= self.checked or not (self.stop_on_nonfinite or self.max_skipped):
            return
        self.checked = step
        if self.stop_on_nonfinite:
            if not np.isfinite(loss := float(metrics["loss"])):
                self._stop(step, f"the loss is {loss} at step {step}", "set train.skip_nonfinite"
                           "=True to skip such steps")
            return
        skipped = int(metrics["skipped_steps"])
        self.skipping_since = (self.skipping_since or step) if skipped > self.skipped else None
        self.skipped = skipped
        if self.skipping_since and step - self.skipping_since + 1 >= self.max_skipped:
            self._stop(self.skipping_since, f"{step - self.skipping_since + 1} consecutive steps "
                       f"were skipped (steps {self.skipping_since}-{step}: non-finite gradients; "
                       f"loss scale {float(metrics['loss_scale']):g} at step {step})",
                       "raise train.max_skipped_steps (0: no limit) to keep going")

    def _stop(self, first_bad: int, what: str, advice: str) -> None:
        """Sets aside the checkpoints of states from first_bad - 1 on (the first one's parameters
        gave the bad step), and stops naming the newest checkpoint left."""
        self.ckpt.wait()
        bad = [s for s in self.ckpt.all_steps() if s >= first_bad - 1]
        self.ckpt.set_aside(bad, "nonfinite")
        last = max(self.ckpt.all_steps(), default=None)
        moved = (f" Checkpoint{'s' * (len(bad) > 1)} {', '.join(map(str, bad))} hold the "
                 "parameters that gave it (or later ones): moved aside as STEP.nonfinite."
                 ) if bad else ""
        resume = (f"step {last}: the same command resumes from it" if last else
                  "none: the same command starts from scratch")
        raise TrainingStopped(
            f"{what}: stopping.{moved} The last good checkpoint is {resume}. Lower optim.lr, "
            f"raise optim.warmup_steps or optim.clip_norm, or {advice}")

    def save(self, step: int, state: TrainState, metrics: dict) -> None:
        self.check(step, metrics)
        if step not in self.saved:
            self.ckpt.save(step, state, self.train_data.state_dict(), self.run.to_dict())
            self.saved.add(step)


def _evaluator(run: RunConfig, trainer: Trainer, eval_data: Loader, tracker: Tracker):
    """evaluate(step, params): the mean loss over the first batches of the validation split."""
    t = run.train
    batches = min(t.eval_batches, eval_data.num_sequences // t.batch_size)
    if batches < t.eval_batches:  # rather than averaging the same batches twice
        tracker.write(f"note: the validation split holds {batches} batches of "
                      f"{t.batch_size} x {t.seq_len}; evaluating on those, not "
                      f"train.eval_batches={t.eval_batches}")

    def evaluate(step: int, params) -> None:
        sums = [trainer.eval_step(params, eval_data.batch_at(LoaderState(0, i * t.batch_size)),
                                  i) for i in range(batches)]
        record = eval_record(jax.tree.map(lambda *x: float(np.sum(x)), *jax.device_get(sums)))
        tracker.log(step, record)
        tracker.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items()))
    return evaluate


def _head_evaluator(run: RunConfig, trainer: Trainer, eval_data, data, tracker: Tracker):
    """evaluate(step, params): a fine-tuning run's metrics on the whole of data.eval_path
    (lm.finetune.evaluate); nothing without one."""
    def evaluate(step: int, params) -> None:
        if eval_data is None:
            return
        record = finetune.evaluate(run, trainer.eval_step, params, eval_data, data.eval)
        tracker.log(step, record)
        tracker.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items()))
    if eval_data is None:
        tracker.write("note: no data.eval_path: the run logs no evaluation")
    return evaluate


def eval_record(sums: dict[str, float]) -> dict[str, float]:
    """The logged evaluation metrics of `eval_step`'s summed outputs: eval_loss (per predicted
    token for masked-LM), eval_mlm_accuracy, eval_nsp_accuracy."""
    record = {"eval_loss": sums["loss"] / max(sums["count"], 1)}
    if "mlm_right" in sums:
        record["eval_mlm_accuracy"] = sums["mlm_right"] / max(sums["count"], 1)
    if "nsp_right" in sums:
        record["eval_nsp_accuracy"] = sums["nsp_right"] / sums["rows"]
    return record


def _print_sample(run: RunConfig, trainer: Trainer, state: TrainState, tokenizer, mesh) -> None:
    """A continuation of "def " by the final model, through the serving engine."""
    prompt = [int(x) for x in tokenizer.encode("def ")]
    # Positions past train.seq_len were never trained (learned position embeddings).
    n = min(run.train.sample_tokens, run.train.seq_len - len(prompt))
    engine = generate.Engine(trainer.graphdef, state.params, tokenizer, mesh=mesh)
    ids = engine.generate([prompt], generate.SamplingParams(
        max_new_tokens=n, temperature=0.7, seed=run.train.seed))[0]
    if jax.process_index() == 0:
        print("----- sample -----\n" + tokenizer.decode(np.asarray(prompt + ids, np.int32)) +
              "\n------------------", flush=True)


def _check_batch_splits(run: RunConfig, mesh) -> None:
    t = run.train
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.batch_size % (data_ways * t.microbatches):
        raise ConfigError(f"'train.batch_size' ({t.batch_size}) must be divisible by "
                          f"train.microbatches x mesh.data x mesh.fsdp "
                          f"({t.microbatches} x {data_ways}): each microbatch is split over "
                          "the data devices")


def _loaders(run: RunConfig, dataset: Dataset, mesh) -> tuple[Loader, Loader]:
    """The train loader (shuffled, prefetching, resumable) and the validation loader."""
    t = run.train
    if run.task.finetune:
        return finetune.loaders(run, dataset, sharding.batch_sharding(mesh))
    if run.model.vocab_size < dataset.tokenizer.vocab_size:
        raise ConfigError(f"'model.vocab_size' ({run.model.vocab_size}) is smaller than the "
                          f"vocabulary of the tokenizer of {dataset.path} "
                          f"({dataset.tokenizer.vocab_size})")
    batch_sharding = sharding.batch_sharding(mesh)
    make = Loader
    if run.task.masked:  # BERT examples: [CLS] A [SEP] (B [SEP]), token types, lengths
        tok = dataset.tokenizer
        make = functools.partial(
            BertLoader, task=run.task.name, nsp_random_prob=run.task.nsp_random_prob,
            cls_id=getattr(tok, "cls_id", None), sep_id=getattr(tok, "sep_id", None),
            pad_id=tok.pad_id, eod_id=tok.eod_id)
    try:
        train_data = make(dataset.split("train"), t.batch_size, t.seq_len, t.seed,
                          batch_sharding, shuffle=run.data.shuffle, prefetch=run.data.prefetch,
                          fingerprint=dataset.fingerprint, split="train")
        eval_data = make(dataset.split("val"), t.batch_size, t.seq_len, t.seed, batch_sharding,
                         shuffle=False, split="val")
    except ValueError as e:
        raise ConfigError(f"data {dataset.path}: {e}") from None
    return train_data, eval_data


def _masking(run: RunConfig, dataset: Dataset) -> Masking | None:
    """A masked-LM task's token ids, from the data's tokenizer."""
    if not run.task.masked:
        return None
    try:
        return Masking.of(dataset.tokenizer, run.model.vocab_size)
    except ValueError as e:
        raise ConfigError(f"task.name {run.task.name!r} on {dataset.path}: {e}") from None


def _record_data(workdir: str, dataset: Dataset) -> None:
    """WORKDIR/data.json: where generation and serving find the tokenizer."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, DATA_FILE), "w") as f:
            json.dump({"path": dataset.path, "fingerprint": dataset.fingerprint,
                       "tokenizer": dataset.tokenizer.save(workdir)}, f, indent=1)


def _check_writable(workdir: str) -> None:
    """A clear error now for a workdir that cannot be written, not at the first save."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir} is not writable: {e}") from None


def _initial_state(run: RunConfig, trainer: Trainer, ckpt: Checkpointer, train_data: Loader,
                   tracker: Tracker) -> tuple[int, TrainState]:
    """(step, state): the latest good checkpoint's, else fresh (from train.init_from's
    parameters if set)."""
    if ckpt.all_steps():
        restored = ckpt.restore_latest(trainer.abstract_state(), run.to_dict(), tracker.write)
        if restored is None:
            raise ConfigError(f"no checkpoint in {ckpt.directory} could be restored (the "
                              "damaged ones were moved aside as STEP.damaged); run again to "
                              "start from scratch, or use another --workdir")
        step, state, loader_state = restored
        if step < run.train.phase_start:
            raise ConfigError(f"train.phase_start is {run.train.phase_start} but the newest "
                              f"checkpoint in {ckpt.directory} is step {step}: finish the "
                              "previous phase first (run its config to that step)")
        if loader_state is not None:
            new_phase = step == run.train.phase_start  # its data may have another shape
            if new_phase and step:
                tracker.write(f"step {step} = train.phase_start: a new phase; its data starts "
                              "from the beginning")
            try:
                train_data.load_state_dict(loader_state, new_phase=new_phase and step > 0)
            except ValueError as e:
                raise ConfigError(f"cannot resume step {step}: {e}") from None
        return step, state
    if run.train.phase_start:
        raise ConfigError(f"train.phase_start is {run.train.phase_start}: this phase continues "
                          f"the previous one's checkpoint at that step, but {ckpt.directory} "
                          "holds none; run the previous phase in this workdir first")
    if run.train.init_from:
        abstract = trainer.abstract_state().params
        heads = run.task.finetune  # the checkpoint's heads may differ: restore what both have
        _, _, step, params = load_params(run.train.init_from, lambda _: abstract, tracker.write,
                                         heads=heads)
        if heads:
            params = merge_params(trainer.init().params, params)
        tracker.write(f"parameters from {run.train.init_from} (step {step})")
        return 0, trainer.init_from_params(params)
    return 0, trainer.init()


class _StopRequest:
    """SIGTERM / SIGINT (a preemption notice, Ctrl-C) ask the loop to save and stop at the next
    step boundary; a second SIGINT interrupts at once. With several processes, all stop at the
    same step: each step they agree on whether any process was signalled."""

    def __init__(self):
        self.name = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.name = signal.Signals(signum).name
        if signum == signal.SIGINT:  # a second Ctrl-C is a KeyboardInterrupt
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.name is not None
        requested = multihost_utils.process_allgather(np.int32(self.name is not None))
        if requested.any() and self.name is None:
            self.name = "a stop request on another process"
        return bool(requested.any())

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def open_dataset(run: RunConfig, workdir: str) -> Dataset:
    """`data.path`, or the embedded corpus prepared into WORKDIR/data (once; later runs in the
    same workdir reuse it). Each process prepares its own copy: no race on a shared filesystem."""
    path = run.data.path
    if not path:
        name = "stdlib" + ("" if run.data.tokenizer == "bytes" else
                           "-" + run.data.tokenizer.replace(":", ""))
        name += "" if jax.process_index() == 0 else f".{jax.process_index()}"
        try:
            path = prepare_stdlib(os.path.join(workdir, "data", name), run.data.val_fraction,
                                  tokenizer=run.data.tokenizer)
        except (ValueError, PrepareError) as e:
            raise ConfigError(f"'data.tokenizer': {e}") from None
    try:
        return Dataset(path)
    except ValueError as e:
        raise ConfigError(f"'data.path': {e}") from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else ["lm.train", *argv]
    flag_values = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(  # sys_argv: where the --config.* overrides are
        "config", None, "configs/NAME.py[:ARG]", flag_values=flag_values, lock_config=True,
        sys_argv=argv)
    workdir = flags.DEFINE_string("workdir", None, "output directory", flag_values=flag_values)
    # Multi-process runs (lm.distributed): flags, else LM_* / SLURM / Open MPI environment.
    processes = [define(name, None, about, flag_values=flag_values) for define, name, about in (
        (flags.DEFINE_string, "coordinator", "HOST:PORT of process 0"),
        (flags.DEFINE_integer, "num_processes", "processes in the run"),
        (flags.DEFINE_integer, "process_id", "this process, 0..num_processes-1"),
        (flags.DEFINE_string, "local_device_ids", "comma-separated devices of this process"))]
    try:
        flag_values(argv)
        distributed.initialize(*(f.value for f in processes))
        if config_flag.value is None:
            raise ConfigError("--config is required, e.g. --config configs/tiny.py")
        if workdir.value is None:
            raise ConfigError("--workdir is required: where metrics, tb/ and checkpoints go")
        run = from_config_dict(config_flag.value)
    except (KeyError, AttributeError) as e:  # config_flags: --config.<unknown key>=...
        while e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        print(f"lm.train: error: unknown config key {e.args[0] if e.args else e}",
              file=sys.stderr)
        sys.exit(2)
    except (flags.Error, ConfigError, TypeError, ValueError) as e:
        print(f"lm.train: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        train(run, workdir.value)
    except ConfigError as e:  # problems only visible once devices and data are known
        print(f"lm.train: error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        print(f"lm.train: stopped: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
