"""`python -m lm.train --config configs/NAME.py[:ARG] --workdir DIR [--config.a.b=VALUE ...]`

The training entry point, the same command on every host. It validates the config into frozen
dataclasses, builds the mesh, creates parameters and optimizer state already sharded (a jitted
constructor with out_shardings from the logical axis names), then runs one jitted train step per
batch: forward, cross-entropy, backward, AdamW. Metrics go to DIR/metrics.jsonl, DIR/tb and the
progress bar; the final state to DIR/checkpoints (orbax); a generated sample ends the run.
"""
from __future__ import annotations

import dataclasses
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
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lm import distributed, generate, sharding
from lm.checkpoint import Checkpointer, restore_params
from lm.config import ConfigError, RunConfig, from_config_dict
from lm.data.corpus import prepare_stdlib
from lm.data.dataset import Dataset
from lm.data.loader import Loader, LoaderState
from lm.data.tokenizer import DATA_FILE
from lm.model import Transformer
from lm.pipeline import Pipeline
from lm.optim import LossScale, all_finite, make_optimizer, schedule
from lm.tracking import Tracker


@dataclasses.dataclass
class Trainer:
    """The jitted functions and shardings of one run; built once, before the loop."""
    run: RunConfig
    mesh: jax.sharding.Mesh
    graphdef: Any
    tx: optax.GradientTransformation
    state_sharding: dict[str, Any]
    init: Any        # () -> state
    init_from_params: Any  # params -> state (fresh optimizer state around given parameters)
    train_step: Any  # (state, batch) -> (state, metrics)
    eval_step: Any   # (params, batch) -> loss

    def abstract_state(self) -> dict[str, Any]:
        """Shapes, dtypes and shardings of the state (for restoring onto this mesh)."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            jax.eval_shape(self.init), self.state_sharding)


def loss_fn(graphdef, params, batch_bt: jax.Array, pipeline: Pipeline | None = None
            ) -> jax.Array:
    """Mean next-token cross-entropy (float32) of a [B, T + 1] batch.

    With a pipeline, the output layer and the loss run one pipeline micro-batch at a time
    (checkpointed), so the [B, T, V] logits of the whole batch never exist at once."""
    model = nnx.merge(graphdef, params)
    xent = lambda logits_btv, targets_bt: optax.softmax_cross_entropy_with_integer_labels(
        logits_btv.astype(jnp.float32), targets_bt)
    if pipeline is None:
        return xent(model(batch_bt[:, :-1]), batch_bt[:, 1:]).mean()
    x_btd = model.hidden(batch_bt[:, :-1], pipeline=pipeline)
    m = pipeline.microbatches
    b, t, d = x_btd.shape
    x_mbtd = x_btd.reshape(b // m, m, t, d).swapaxes(0, 1)  # row r -> micro-batch r % M
    y_mbt = batch_bt[:, 1:].reshape(b // m, m, t).swapaxes(0, 1)
    chunk_loss = jax.checkpoint(lambda x_btd, y_bt: xent(model.logits(x_btd), y_bt).sum())
    total, _ = jax.lax.scan(lambda acc, xy: (acc + chunk_loss(*xy), None),
                            jnp.zeros((), jnp.float32), (x_mbtd, y_mbt))
    return total / (b * t)


def build(run: RunConfig, mesh: jax.sharding.Mesh) -> Trainer:
    """Traces nothing yet: works out shapes and shardings abstractly and wraps the jits.

    The state is {"step", "params", "opt_state", "loss_scale"}. With precision.master_weights
    the parameters are bfloat16/float16 and opt_state is {"master": float32 parameters, "tx":
    the optimizer's state over them}; the optimizer updates the masters and the parameters are
    their rounded copy.
    """
    tx = make_optimizer(run.optim, run.train.steps)
    master = run.precision.master_weights
    scaler = LossScale(run.precision, run.precision.dynamic(run.model))
    check_finite = scaler.dynamic or run.train.skip_nonfinite
    k = run.train.microbatches
    pipe = _pipeline(run, mesh)
    make_model = lambda: Transformer(run.model, rngs=nnx.Rngs(params=run.train.seed))
    lay = sharding.layout(run.mesh.rules)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.REPLICATED):
        graphdef, abs_params = nnx.split(nnx.eval_shape(make_model))  # shapes only
    param_sharding = sharding.param_shardings(abs_params, mesh, lay.params)
    opt_param_sharding = sharding.param_shardings(abs_params, mesh, lay.opt)
    replicated = NamedSharding(mesh, P())
    to_f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    abs_opt_params = jax.eval_shape(to_f32, abs_params) if master else abs_params
    opt_sharding = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, abs_opt_params), opt_param_sharding,
        transform_non_params=lambda _: replicated)
    if master:
        opt_sharding = {"master": opt_param_sharding, "tx": opt_sharding}
    state_sharding = {"step": replicated, "params": param_sharding, "opt_state": opt_sharding,
                      "loss_scale": jax.tree.map(lambda _: replicated, scaler.init())}
    batch_axes = sharding.batch_sharding(mesh).spec[0]

    def init():
        return init_from_params(nnx.state(make_model()))

    def init_from_params(params):
        opt_state = ({"master": to_f32(params), "tx": tx.init(to_f32(params))} if master
                     else tx.init(params))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state,
                "loss_scale": scaler.init()}

    def reduce(grads):
        """ZeRO-2/3: each replica keeps only its shard of the gradients (a reduce-scatter)."""
        return (jax.lax.with_sharding_constraint(grads, opt_param_sharding)
                if lay.scatter_grads else grads)

    def grads_and_loss(params, batch_bt, scale):
        """Float32 gradients of the mean loss (unscaled), and the loss. Gradients stay in the
        parameter dtype until reduced (ZeRO's accounting: 2 bytes per parameter in fp16); K
        microbatches are a scan that sums them into float32, sharded like the optimizer state
        under zero2/zero3."""
        scaled = jax.value_and_grad(lambda p, b: loss_fn(graphdef, p, b, pipe) * scale)
        if k == 1:
            loss, grads = scaled(params, batch_bt)
            grads = to_f32(reduce(grads))
        else:
            # Row r goes to microbatch r % K: each device's rows stay on it.
            b, t1 = batch_bt.shape
            micro_kbt = batch_bt.reshape(b // k, k, t1).swapaxes(0, 1)
            micro_kbt = jax.lax.with_sharding_constraint(
                micro_kbt, NamedSharding(mesh, P(None, batch_axes)))

            def accumulate(carry, micro_bt):
                loss, grads = scaled(params, micro_bt)
                return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), carry,
                                    (loss, reduce(grads))), None

            zeros = (jnp.zeros((), jnp.float32), reduce(jax.tree.map(
                lambda p: jnp.zeros(p.shape, jnp.float32), params)))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro_kbt)
            loss, grads = loss / k, jax.tree.map(lambda g: g / k, grads)
        return loss / scale, jax.tree.map(lambda g: g / scale, grads)

    def train_step(state, batch_bt):
        with nnx.logical_axis_rules(lay.acts):  # the model's activation constraints
            return _train_step(state, batch_bt)

    def _train_step(state, batch_bt):
        params, opt_state, ls = state["params"], state["opt_state"], state["loss_scale"]
        loss, grads = grads_and_loss(params, batch_bt, ls["scale"])
        if master:
            updates, tx_state = tx.update(grads, opt_state["tx"], opt_state["master"])
            masters = optax.apply_updates(opt_state["master"], updates)
            new_params = jax.tree.map(lambda m, p: m.astype(p.dtype), masters, params)
            new_opt_state = {"master": masters, "tx": tx_state}
        else:
            grads_p = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
            updates, new_opt_state = tx.update(grads_p, opt_state, params)
            new_params = optax.apply_updates(params, updates)
        finite = all_finite(grads)
        if check_finite:  # a bad step changes nothing but the loss-scale state
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            new_params, new_opt_state = keep(new_params, params), keep(new_opt_state, opt_state)
        new_ls = scaler.update(ls, finite) if check_finite else ls
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "loss_scale": ls["scale"],
                   "skipped_steps": new_ls["skipped"]}
        return {"step": state["step"] + 1, "params": new_params, "opt_state": new_opt_state,
                "loss_scale": new_ls}, metrics

    def eval_step(params, batch_bt):
        with nnx.logical_axis_rules(lay.acts):
            return _eval_step(params, batch_bt)

    def _eval_step(params, batch_bt):
        """The mean loss, in the same microbatches as training (the same peak memory)."""
        if k == 1:
            return loss_fn(graphdef, params, batch_bt, pipe)
        b, t1 = batch_bt.shape
        micro_kbt = jax.lax.with_sharding_constraint(
            batch_bt.reshape(b // k, k, t1).swapaxes(0, 1),
            NamedSharding(mesh, P(None, batch_axes)))
        return jax.lax.map(lambda mb: loss_fn(graphdef, params, mb, pipe), micro_kbt).mean()

    return Trainer(
        run=run, mesh=mesh, graphdef=graphdef, tx=tx, state_sharding=state_sharding,
        init=jax.jit(init, out_shardings=state_sharding),
        init_from_params=jax.jit(init_from_params, out_shardings=state_sharding),
        train_step=jax.jit(train_step, donate_argnums=(0,),
                           out_shardings=(state_sharding, replicated)),
        eval_step=jax.jit(eval_step),
    )


def _pipeline(run: RunConfig, mesh: jax.sharding.Mesh) -> Pipeline | None:
    """The pipeline schedule of `run` on `mesh` (None without a `pipeline` axis), checked."""
    stages = mesh.shape["pipeline"]
    if stages == 1:
        return None
    pp, t = run.pipeline, run.train
    pipe = Pipeline(stages, pp.microbatches, pp.virtual_stages)
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


def train(run: RunConfig, workdir: str) -> dict[str, Any]:
    """Runs `run` to completion in `workdir`, resuming from its latest complete checkpoint;
    returns the final state (sharded arrays). SIGTERM / SIGINT save a checkpoint at the next
    step boundary and return early."""
    workdir = os.path.abspath(workdir)
    _check_writable(workdir)
    mesh = sharding.make_mesh(run.mesh)
    t, m = run.train, run.model
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.batch_size % (data_ways * t.microbatches):
        raise ConfigError(f"'train.batch_size' ({t.batch_size}) must be divisible by "
                          f"train.microbatches x mesh.data x mesh.fsdp "
                          f"({t.microbatches} x {data_ways}): each microbatch is split over "
                          "the data devices")
    ckpt = Checkpointer(workdir, keep=run.checkpoint.keep, keep_every=run.checkpoint.keep_every,
                        async_save=run.checkpoint.async_save)
    if ckpt.all_steps():
        _check_same_model(run, ckpt)
    dataset = open_dataset(run, workdir)
    tokenizer = dataset.tokenizer
    if m.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"'model.vocab_size' ({m.vocab_size}) is smaller than the vocabulary "
                          f"of the tokenizer of {dataset.path} ({tokenizer.vocab_size})")
    batch_sharding = sharding.batch_sharding(mesh)
    try:
        train_data = Loader(dataset.split("train"), t.batch_size, t.seq_len, t.seed,
                            batch_sharding, shuffle=run.data.shuffle, prefetch=run.data.prefetch,
                            fingerprint=dataset.fingerprint)
        eval_data = Loader(dataset.split("val"), t.batch_size, t.seq_len, t.seed, batch_sharding,
                           shuffle=False)
    except ValueError as e:
        raise ConfigError(f"data {dataset.path}: {e}") from None
    if jax.process_index() == 0:  # generation and serving find the tokenizer in the workdir
        with open(os.path.join(workdir, DATA_FILE), "w") as f:
            json.dump({"path": dataset.path, "fingerprint": dataset.fingerprint,
                       "tokenizer": tokenizer.save(workdir)}, f, indent=1)

    tracker = Tracker(workdir, t.steps, progress=t.progress)
    tracker.log_hparams(run.to_dict(), workdir)
    eval_batches = min(t.eval_batches, eval_data.num_sequences // t.batch_size)
    if eval_batches < t.eval_batches:  # rather than averaging the same batches twice
        tracker.write(f"note: the validation split holds {eval_batches} batches of "
                      f"{t.batch_size} x {t.seq_len}; evaluating on those, not "
                      f"train.eval_batches={t.eval_batches}")
    lr = schedule(run.optim, t.steps)
    stop = _StopRequest()
    with jax.set_mesh(mesh), stop:  # build() sets the rules of mesh.rules inside its jits
        trainer = build(run, mesh)
        start, state = _initial_state(run, trainer, ckpt, train_data, tracker)
        tracker.write(f"{sum(x.size for x in jax.tree.leaves(state['params'])):,} parameters, "
                      f"mesh {dict(mesh.shape)}, {dataset.num_tokens('train'):,} train tokens "
                      f"({train_data.num_sequences:,} sequences) from {dataset.path}" +
                      (f"; resumed from step {start}" if start else ""))
        tracker.advance(start)
        check_finite = not (run.train.skip_nonfinite or run.precision.dynamic(run.model))
        saved = set(ckpt.all_steps())

        def save(step):
            if step not in saved:
                ckpt.save(step, state, train_data.state_dict(), run.to_dict())
                saved.add(step)

        def require_finite(step, loss):
            if check_finite and not np.isfinite(float(loss)):
                ckpt.wait()
                last = max(saved, default=None)
                raise TrainingStopped(
                    f"the loss is {float(loss)} at step {step}: stopping (the state after it is "
                    f"not saved; the last good checkpoint is "
                    f"{f'step {last}' if last else 'none'}). Lower optim.lr, raise "
                    "optim.warmup_steps or optim.clip_norm, or set train.skip_nonfinite=True to "
                    "skip such steps")

        window_start, window_steps = None, 0
        previous = None  # (step, loss) of the step before, checked once the next is queued
        step = start
        for step in range(start + 1, t.steps + 1):
            state, metrics = trainer.train_step(state, next(train_data))
            if previous is not None:
                require_finite(*previous)
            previous = (step, metrics["loss"])
            window_steps += 1
            if window_start is None:  # the first step compiles; time from its end
                jax.block_until_ready(metrics)
                window_start, window_steps = time.perf_counter(), 0
            if step % t.log_every == 0 or step == t.steps:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_start
                # The schedule follows the optimizer's count, which skipped steps do not advance.
                applied = step - 1 - int(metrics["skipped_steps"])
                record = {"loss": float(metrics["loss"]), "lr": float(lr(applied)),
                          "grad_norm": float(metrics["grad_norm"]),
                          "loss_scale": float(metrics["loss_scale"]),
                          "skipped_steps": int(metrics["skipped_steps"]),
                          "tokens_per_s": window_steps * t.batch_size * t.seq_len / elapsed
                          if window_steps else 0.0}
                tracker.log(step, record)
                window_start, window_steps = time.perf_counter(), 0
            if step % t.eval_every == 0 or step == t.steps:
                require_finite(step, metrics["loss"])
                losses = [trainer.eval_step(state["params"],
                                            eval_data.batch_at(LoaderState(0, i * t.batch_size)))
                          for i in range(eval_batches)]
                eval_loss = float(np.mean(jax.device_get(losses)))
                tracker.log(step, {"eval_loss": eval_loss})
                tracker.write(f"step {step}: eval_loss {eval_loss:.4f}")
                window_start, window_steps = time.perf_counter(), 0  # don't bill eval to training
            if run.checkpoint.every and step % run.checkpoint.every == 0:
                require_finite(step, metrics["loss"])
                save(step)
            tracker.advance(step)
            if stop.agreed(step):
                require_finite(step, metrics["loss"])
                save(step)
                tracker.write(f"received {stop.name}: saved step {step} in {ckpt.directory}; "
                              "run the same command to resume")
                break
        else:
            if previous is not None:
                require_finite(*previous)
            save(step)
        train_data.close()
        ckpt.close()
    tracker.finish()
    if stop.name:
        return state

    if t.sample_tokens:
        prompt = tokenizer.encode("def ")[None].astype(np.int32)
        # Positions past train.seq_len were never trained (learned position embeddings).
        n = min(t.sample_tokens, t.seq_len - prompt.shape[1])
        with jax.set_mesh(mesh):
            out = generate.sample(trainer.graphdef, state["params"], prompt=jnp.asarray(prompt),
                                  num_tokens=n, seed=t.seed)
        if jax.process_index() == 0:
            print("----- sample -----\n" + tokenizer.decode(jax.device_get(out)[0]) +
                  "\n------------------", flush=True)
    return state


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


def _check_same_model(run: RunConfig, ckpt: Checkpointer) -> None:
    """Resuming must train the same model: compare with the config saved in the checkpoint."""
    saved = ckpt.restore_config(ckpt.latest_step())
    if saved is None:
        return
    now = run.to_dict()
    diff = {k: (saved["model"].get(k), v) for k, v in now["model"].items()
            if saved["model"].get(k) != v}
    if diff:
        raise ConfigError(f"--workdir {os.path.dirname(ckpt.directory)} holds checkpoints of "
                          "another model (" + ", ".join(f"model.{k}: saved {a!r}, now {b!r}"
                                                        for k, (a, b) in diff.items()) +
                          "); use a new --workdir, or train.init_from to start from its "
                          "parameters")


def _initial_state(run: RunConfig, trainer: Trainer, ckpt: Checkpointer, train_data: Loader,
                   tracker: Tracker) -> tuple[int, dict[str, Any]]:
    """(step, state): the latest good checkpoint's, else fresh (from train.init_from's
    parameters if set)."""
    if ckpt.all_steps():
        restored = ckpt.restore_latest(trainer.abstract_state(), log=tracker.write)
        if restored is None:
            raise ConfigError(f"no checkpoint in {ckpt.directory} could be restored (the "
                              "damaged ones were moved aside as STEP.damaged); run again to "
                              "start from scratch, or use another --workdir")
        step, state, loader_state = restored
        if loader_state is not None:
            try:
                train_data.load_state_dict(loader_state)
            except ValueError as e:
                raise ConfigError(f"cannot resume step {step}: {e}") from None
        return step, state
    if run.train.init_from:
        abstract = trainer.abstract_state()["params"]
        step, params = restore_params(run.train.init_from, abstract)
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
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.int32(self.name is not None))
        if flags.any() and self.name is None:
            self.name = "a stop request on another process"
        return bool(flags.any())

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def open_dataset(run: RunConfig, workdir: str) -> Dataset:
    """`data.path`, or the embedded corpus prepared into WORKDIR/data (once; later runs in the
    same workdir reuse it). Each process prepares its own copy: no race on a shared filesystem."""
    path = run.data.path
    if not path:
        name = "stdlib" if jax.process_index() == 0 else f"stdlib.{jax.process_index()}"
        path = prepare_stdlib(os.path.join(workdir, "data", name), run.data.val_fraction)
    try:
        return Dataset(path)
    except ValueError as e:
        raise ConfigError(f"'data.path': {e}") from None


def main(argv: list[str] | None = None) -> None:
    from absl import flags
    from ml_collections import config_flags

    argv = sys.argv if argv is None else ["lm.train", *argv]
    flag_values = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(  # sys_argv: where the --config.* overrides are
        "config", None, "configs/NAME.py[:ARG]", flag_values=flag_values, lock_config=True,
        sys_argv=argv)
    workdir = flags.DEFINE_string("workdir", None, "output directory", flag_values=flag_values)
    # Multi-process runs (lm.distributed): flags, else LM_* / SLURM / Open MPI environment.
    coordinator = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0",
                                      flag_values=flag_values)
    num_processes = flags.DEFINE_integer("num_processes", None, "processes in the run",
                                         flag_values=flag_values)
    process_id = flags.DEFINE_integer("process_id", None, "this process, 0..num_processes-1",
                                      flag_values=flag_values)
    local_device_ids = flags.DEFINE_string("local_device_ids", None,
                                           "comma-separated devices of this process",
                                           flag_values=flag_values)
    try:
        flag_values(argv)
        distributed.initialize(coordinator.value, num_processes.value, process_id.value,
                               local_device_ids.value)
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
