"""Orbax checkpoints under WORKDIR/checkpoints/STEP, one directory per saved step, with items

    state   the train state (`lm.train.TrainState`), stored as the dict {"step", "params",
            "opt_state", "loss_scale"} with master weights as opt_state {"master", "tx"} (the
            layout lm has always written, so older checkpoints restore), sharded: every
            process writes only its own shards (orbax's OCDBT), and restores onto any mesh
    loader  the data loader's state (JSON): the next batch of a resumed run is the next batch
    config  the resolved run config (JSON), so a resume can check it trains the same model

Saves are asynchronous by default: the train loop only waits for the device-to-host copy, and
orbax writes each step into a temporary directory renamed when complete, so a process killed
mid-save never leaves a step that would be picked up.

Which step is used is decided in one place for every consumer: `Checkpointer.restore_latest`
(training) and `load_params` (train.init_from, generate, serve, export, convert) judge each step
newest first as incompatible (another model, optimizer or tree: an error, nothing renamed),
damaged (missing, truncated or unreadable files: training moves it aside as STEP.damaged, readers
skip it) or transient (out of memory, I/O trouble: an error, nothing renamed).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import sys
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as keeping

from lm.config import ConfigError, ModelConfig, RunConfig, defaults, from_config_dict


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 2, keep_every: int = 0,
                 async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.keep, self.keep_every = keep, keep_every
        self.options = dict(enable_async_checkpointing=async_save, read_only=read_only)
        self.manager = self._manager()

    def _manager(self) -> ocp.CheckpointManager:
        policies = [keeping.LatestN(self.keep), keeping.CustomSteps(self._promised())]
        policies += [keeping.EveryNSteps(self.keep_every)] if self.keep_every else []
        return ocp.CheckpointManager(
            self.directory, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                           "loader": ocp.JsonCheckpointHandler(),
                                           "config": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                create=not self.options["read_only"],
                preservation_policy=keeping.AnyPreservationPolicy(policies), **self.options))

    def _promised(self) -> list[int]:
        """Steps an earlier run kept permanently (a multiple of its checkpoint.keep_every): a
        rerun with another (or no) keep_every must not delete them."""
        promised = []
        for step in (int(d) for d in _listdir(self.directory) if d.isdigit()):
            try:
                every = (saved_config(os.path.join(self.directory, str(step))) or {}).get(
                    "checkpoint", {}).get("keep_every", 0)
            except RESTORE_ERRORS:  # a damaged config: the restore will say so
                continue
            if every and step % every == 0:
                promised.append(step)
        return promised

    def save(self, step: int, state: Any, loader_state: dict | None = None,
             config: dict | None = None) -> None:
        """Starts saving `step` (returns once the arrays are copied off the devices when async);
        a write error of the previous save surfaces here or in `wait`."""
        items = {"state": ocp.args.StandardSave(_on_disk(state))}
        if loader_state is not None:
            items["loader"] = ocp.args.JsonSave(loader_state)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        self._io(lambda: self.manager.save(step, args=ocp.args.Composite(**items), force=True))

    def wait(self) -> None:
        """Blocks until the last save is on disk."""
        self._io(self.manager.wait_until_finished)

    def _io(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (OSError, ValueError, RuntimeError) as e:
            # a full disk, a read-only or vanished workdir (orbax's writer threads report them
            # as ValueError: RESOURCE_EXHAUSTED ... No space left on device)
            raise ConfigError(f"cannot write checkpoints to {self.directory}: "
                              f"{str(e).strip().splitlines()[0][:500]}") from None

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores `step` into the shapes, dtypes and shardings of `abstract_state` (any mesh)."""
        return _from_disk(self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_on_disk(abstract_state))))["state"], abstract_state)

    def restore_latest(self, abstract_state: Any, config: dict | None = None,
                       log: Callable[[str], None] = print) -> tuple[int, Any, dict | None] | None:
        """The newest step that restores, as (step, state, loader state), or None if there is
        none. Each step, newest first, is judged (`_judge`) and all processes agree on it:
        incompatible with `config` (this run's) or with `abstract_state`'s tree -> ConfigError,
        nothing renamed; transient failure -> ConfigError naming it, nothing renamed; damaged ->
        reported through `log`, and once a step restores (or none is left) moved aside as
        STEP.damaged (nothing is deleted)."""
        damaged = []
        for step in reversed(self.all_steps()):
            verdict, detail, restored = self._judge(step, abstract_state, config)
            verdict, detail = _agree(verdict, detail)
            step_dir = os.path.join(self.directory, str(step))
            if verdict == "incompatible":
                raise ConfigError(
                    f"--workdir {os.path.dirname(self.directory)} holds checkpoints this run "
                    f"cannot resume (step {step}: {detail}); nothing was renamed. Use a new "
                    f"--workdir, or --config.train.init_from={step_dir} to start from its "
                    "parameters with a fresh optimizer state")
            if verdict == "transient":
                raise ConfigError(f"cannot read checkpoint {step_dir} now ({detail}); nothing was "
                                  "renamed: run again once the cause (memory, storage) is fixed")
            if verdict == "damaged":
                log(f"checkpoint step {step} in {self.directory} is damaged and was not used "
                    f"({detail}); moving it to {step}.damaged, falling back to the one before")
                damaged.append(step)
                continue
            self.set_aside(damaged, "damaged")
            return (step, *restored)
        self.set_aside(damaged, "damaged")
        return None

    def _judge(self, step: int, abstract_state: Any, config: dict | None
               ) -> tuple[str, str, tuple[Any, dict | None] | None]:
        """(verdict, why, (state, loader state) if "ok") for one step: "ok", "incompatible",
        "damaged" or "transient" (see `_failure`)."""
        step_dir = os.path.join(self.directory, str(step))
        try:
            saved = saved_config(step_dir)
            problems = _config_diff(saved, config) if saved and config else []
            problems += _tree_diff(step_dir, _on_disk(abstract_state))
            if problems:
                return "incompatible", "; ".join(problems), None
            state = self.restore(step, abstract_state)
            loader = self.restore_loader_state(step)
            jax.block_until_ready(state)
            return "ok", "", (state, loader)
        except RESTORE_ERRORS as e:
            return _failure(e), _why(e), None

    def set_aside(self, steps: list[int], why: str) -> None:
        """Renames each step directory to STEP.WHY (STEP.WHY2, ... if taken): process 0 renames
        once every process has reached this point, and all continue once it has."""
        if not steps:
            return
        self.wait()
        _sync(f"lm.checkpoint.set_aside {steps}")
        if jax.process_index() == 0:
            for step in steps:
                path = os.path.join(self.directory, str(step))
                target, n = f"{path}.{why}", 1
                while os.path.exists(target):
                    n += 1
                    target = f"{path}.{why}{n}"
                os.rename(path, target)
        _sync(f"lm.checkpoint.set_aside {steps} done")
        self.manager.close()
        self.manager = self._manager()

    def _has(self, step: int, item: str) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step), item))

    def restore_loader_state(self, step: int) -> dict | None:
        if not self._has(step, "loader"):
            return None
        return self.manager.restore(step, args=ocp.args.Composite(
            loader=ocp.args.JsonRestore()))["loader"]

    def close(self) -> None:
        self.wait()
        self.manager.close()


# What a failed read raises (orbax and tensorstore report most I/O as ValueError); anything else
# is a bug and propagates.
RESTORE_ERRORS = (ValueError, OSError, KeyError, RuntimeError, EOFError, MemoryError)
# Failures that say nothing about the checkpoint: memory, storage that is down or forbidden.
_TRANSIENT = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "UNAVAILABLE",
              "DEADLINE_EXCEEDED", "Input/output error", "Permission denied",
              "Too many open files", "Stale file handle")
_MISSING = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR}


def _failure(e: BaseException) -> str:
    """"transient" (out of memory, an I/O error that is not corruption: rename nothing, fail)
    or "damaged" (missing or truncated files, unreadable metadata: set aside, fall back)."""
    if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno is not None
                                      and e.errno not in _MISSING):
        return "transient"
    return "transient" if any(m in str(e) for m in _TRANSIENT) else "damaged"


def _why(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


_VERDICTS = ("ok", "damaged", "incompatible", "transient")  # in rising precedence


def _agree(verdict: str, detail: str) -> tuple[str, str]:
    """Every process's verdict on a step becomes the gravest of them (one all-gather)."""
    if jax.process_count() == 1:
        return verdict, detail
    codes = multihost_utils.process_allgather(np.int32(_VERDICTS.index(verdict)))
    worst = int(codes.max())
    if worst != _VERDICTS.index(verdict):
        detail = f"process {int(codes.argmax())} found it {_VERDICTS[worst]}"
    return _VERDICTS[worst], detail


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# Keys that must be equal to resume: the model, how its parameters and optimizer state are stored.
RESUME_KEYS = (("precision", "param_dtype"), ("precision", "compute_dtype"),
               ("precision", "master_weights"), ("optim", "name"), ("task", "name"),
               ("task", "labels"))


def _config_diff(saved: dict, now: dict) -> list[str]:
    """The RESUME_KEYS (and model.*, but for its EXECUTION_KEYS) whose saved value
    (`saved_config`'s, already upgraded) differs from this run's; a key missing from an older
    checkpoint counts as its default."""
    default = defaults().to_dict()
    keys = [("model", k) for k in now["model"] if k not in ModelConfig.EXECUTION_KEYS]
    keys += RESUME_KEYS
    return [f"{s}.{k}: saved {old!r}, now {now[s][k]!r}" for s, k in keys
            if (old := saved.get(s, {}).get(k, default[s][k])) != now[s][k]]


_PARTS = {"params": "the parameters", "opt_state": "the optimizer state",
          "loss_scale": "the loss-scale state"}


def _tree_diff(step_dir: str, expected: Any, partial: bool = False) -> list[str]:
    """How the state tree stored in STEP/state differs from `expected` (its paths and shapes),
    per top-level part; `partial`: only the parts `expected` holds are compared."""
    stored = _shapes(ocp.StandardCheckpointHandler().metadata(
        epath.Path(step_dir) / "state"))
    want = _shapes(expected)
    if partial:
        stored = {k: v for k, v in stored.items() if k.split("/")[0] in expected}
    problems = []
    for part in sorted({k.split("/")[0] for k in [*stored, *want]}):
        missing = [k for k in want if k.startswith(part + "/") and k not in stored]
        extra = [k for k in stored if k.startswith(part + "/") and k not in want]
        shapes = [f"{k} saved {stored[k]}, now {want[k]}" for k in want
                  if k in stored and stored[k] != want[k]]
        said = ([f"{len(missing)} entries not in the checkpoint (e.g. {missing[0]})"]
                if missing else []) + ([f"{len(extra)} not in this run (e.g. {extra[0]})"]
                                       if extra else []) + shapes[:2]
        if said:
            problems.append(f"{_PARTS.get(part, part)} differs: " + ", ".join(said))
    return problems


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """path ("params/embed/value") -> shape, for every array leaf of a state or its metadata."""
    return {"/".join(map(_key_name, path)): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(leaf, "shape")}


def saved_config(step_dir: str) -> dict | None:
    """The run config saved in a step (its `config` item), or None for a step without one; a
    damaged item raises (ValueError / OSError)."""
    if not os.path.isdir(os.path.join(step_dir, "config")):
        return None
    return _read_config(os.path.join(step_dir, "config", "metadata"))


def _read_config(path: str) -> dict:
    with open(path) as f:
        return _upgrade(json.load(f))


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def step_dirs(path: str) -> tuple[list[str], bool]:
    """The checkpoint step directories PATH names, newest first (a workdir, its checkpoints/),
    and whether PATH is one step's directory (then the only candidate: no fallback)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")):  # one step: .../checkpoints/STEP
        return [path], True
    root = path if os.path.basename(path) == "checkpoints" else os.path.join(path, "checkpoints")
    steps = sorted((int(d) for d in os.listdir(root) if d.isdigit()), reverse=True) \
        if os.path.isdir(root) else []
    if not steps:
        raise ConfigError(f"no checkpoint in {path}: expected a training workdir, its "
                          "checkpoints/ directory, or one checkpoints/STEP directory")
    return [os.path.join(root, str(s)) for s in steps], False


def load_params(path: str, abstract_for: Callable[[RunConfig | None], Any],
                log: Callable[[str], None] | None = None, heads: bool = False
                ) -> tuple[RunConfig | None, str, int, Any]:
    """(run config, workdir, step, parameters) of the newest readable step PATH names, for
    evaluation, generation, serving, export, conversion and train.init_from; nothing is renamed
    (a reader must not change a workdir). `abstract_for(run config or None)`: the parameters'
    abstract tree (shapes, dtypes, shardings) to restore into. A damaged step is reported
    through `log` (stderr by default) and skipped, unless PATH names that one step; a
    checkpoint of another shape, or a transient failure, is a ConfigError. `heads` (fine-tuning
    from a checkpoint with other heads): only the entries stored with the same shapes are
    restored, as nested dicts for `merge_params`, and the others are reported through `log`."""
    log = log or (lambda message: print(f"lm.checkpoint: {message}", file=sys.stderr))
    dirs, explicit = step_dirs(path)
    for step_dir in dirs:
        workdir = os.path.dirname(os.path.dirname(step_dir))
        try:
            saved = saved_config(step_dir)
            if saved is None and os.path.exists(os.path.join(workdir, "config.json")):
                saved = _read_config(os.path.join(workdir, "config.json"))
            run = None if saved is None else from_config_dict(ml_collections.ConfigDict(saved))
            abstract = abstract_for(run)
            if heads:
                common, new, dropped = _common_params(step_dir, abstract)
                if new or dropped:
                    log(f"{step_dir}: initialised {len(new)} entries it does not hold "
                        f"({', '.join(new[:6])}); not used: {len(dropped)} of its entries "
                        f"({', '.join(dropped[:6])})")
                if not common:
                    raise ConfigError(f"the checkpoint {step_dir} holds none of this model's "
                                      "parameters with the same shape")
                return run, workdir, int(os.path.basename(step_dir)), _restore_params(
                    step_dir, common)
            problems = _tree_diff(step_dir, {"params": abstract}, partial=True)
            if problems:
                raise ConfigError(f"the checkpoint {step_dir} does not fit: " +
                                  "; ".join(problems))
            return run, workdir, int(os.path.basename(step_dir)), _restore_params(step_dir,
                                                                                  abstract)
        except ConfigError:
            raise
        except RESTORE_ERRORS as e:
            if _failure(e) == "transient" or explicit:
                raise ConfigError(f"cannot read checkpoint {step_dir} ({_why(e)})" +
                                  (": it is damaged" if _failure(e) == "damaged" else "")
                                  ) from None
            log(f"checkpoint {step_dir} is damaged and was not used ({_why(e)}); trying the "
                "one before (nothing renamed)")
    raise ConfigError(f"no checkpoint in {path} could be read: every step is damaged")


def checkpoint_config(path: str) -> tuple[dict | None, str]:
    """(the run config saved with the newest step PATH names, or WORKDIR/config.json's, or
    None; the workdir), without reading any array."""
    dirs, _ = step_dirs(path)
    for step_dir in dirs:
        workdir = os.path.dirname(os.path.dirname(step_dir))
        try:
            saved = saved_config(step_dir)
        except (OSError, ValueError):
            continue
        if saved is None and os.path.exists(os.path.join(workdir, "config.json")):
            saved = _read_config(os.path.join(workdir, "config.json"))
        return saved, workdir
    return None, os.path.abspath(path)


def _common_params(step_dir: str, abstract: Any) -> tuple[dict, list[str], list[str]]:
    """(the part of `abstract` (an nnx.State of shapes) that STEP stores with the same shapes, as
    nested dicts; the entries it lacks; the stored entries `abstract` lacks)."""
    stored = {k.removeprefix("params/"): v for k, v in _shapes(
        ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / "state")).items()
        if k.startswith("params/")}
    common: dict = {}
    new = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        names = [_key_name(k) for k in path]
        if stored.get("/".join(names)) != tuple(leaf.shape):
            new.append("/".join(names))
            continue
        node = common
        for n in names[:-1]:
            node = node.setdefault(n, {})
        node[names[-1]] = leaf
    wanted = {"/".join(_key_name(k) for k in p)
              for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    return common, new, sorted(set(stored) - wanted)


def merge_params(params: Any, restored: dict) -> Any:
    """`params` (an nnx.State) with the leaves `restored` (nested dicts, `_common_params`'
    layout) holds replaced."""
    def pick(path, leaf):
        node = restored
        for k in path:
            node = node.get(_key_name(k)) if isinstance(node, dict) else None
            if node is None:
                return leaf
        return node
    return jax.tree_util.tree_map_with_path(pick, params)


def _restore_params(step_dir: str, abstract_params: Any) -> Any:
    with ocp.PyTreeCheckpointer() as ckptr:
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                           dtype=a.dtype), abstract_params)
        return ckptr.restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args},
            partial_restore=True))["params"]


def _on_disk(state: Any) -> Any:
    """The state item as stored: a dataclass state as the dict of its fields, master weights
    (when kept) folded into opt_state as {"master", "tx"}; any other tree as it is."""
    if not dataclasses.is_dataclass(state):
        return state
    tree = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    master = tree.pop("master", None)
    if master is not None:
        tree["opt_state"] = {"master": master, "tx": tree["opt_state"]}
    return tree


def _from_disk(tree: Any, like: Any) -> Any:
    """`_on_disk`'s inverse: `tree` as the type of `like`."""
    if not dataclasses.is_dataclass(like):
        return tree
    if getattr(like, "master", None) is not None:
        opt = tree["opt_state"]
        tree = {**tree, "master": opt["master"], "opt_state": opt["tx"]}
    return type(like)(**tree)


def _upgrade(saved: dict) -> dict:
    """A saved config in today's schema. Before the precision section held the dtypes, they
    were saved under model; an 'interleaved' schedule with one virtual stage ran as gpipe."""
    model, precision = saved.get("model", {}), saved.setdefault("precision", {})
    precision.update({k: model.pop(k) for k in ("param_dtype", "compute_dtype") if k in model})
    pipeline = saved.get("pipeline", {})
    if pipeline.get("schedule") == "interleaved" and pipeline.get("virtual_stages") == 1:
        pipeline["schedule"] = "gpipe"
    return saved
