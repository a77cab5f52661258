"""Orbax checkpoints under WORKDIR/checkpoints/STEP, one directory per saved step, with items

    state   the train state (`lm.train.TrainState`), stored as the dict {"step", "params",
            "opt_state", "loss_scale"} with master weights as opt_state {"master", "tx"} (the
            layout lm has always written, so older checkpoints restore), sharded: every
            process writes only its own shards (orbax's OCDBT), and restores onto any mesh
    loader  the data loader's state (JSON): the next batch of a resumed run is the next batch
    config  the resolved run config (JSON), so a resume can check it trains the same model

Saves are asynchronous by default: the train loop only waits for the device-to-host copy, and
orbax writes each step into a temporary directory renamed when complete, so a process killed
mid-save never leaves a step that would be picked up. A step that is complete but damaged
(truncated or missing files) fails to restore: `restore_latest` then names it, moves it aside
(`STEP.damaged`, nothing is deleted) and uses the one before.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp

from lm.config import ConfigError, from_config_dict


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 2, keep_every: int = 0,
                 async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.options = dict(max_to_keep=keep, keep_period=keep_every or None,
                            enable_async_checkpointing=async_save, read_only=read_only)
        self.manager = self._manager()

    def _manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                           "loader": ocp.JsonCheckpointHandler(),
                                           "config": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(create=not self.options["read_only"],
                                                 **self.options))

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

    def restore_latest(self, abstract_state: Any, log: Callable[[str], None] = print
                       ) -> tuple[int, Any, dict | None] | None:
        """The newest step that restores, as (step, state, loader state), or None if there is
        none. Damaged steps are reported through `log` and moved aside."""
        for step in reversed(self.all_steps()):
            try:
                state = self.restore(step, abstract_state)
                loader = self.restore_loader_state(step)
                jax.block_until_ready(state)
                return step, state, loader
            except (ValueError, OSError, KeyError, RuntimeError) as e:
                reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                log(f"checkpoint step {step} in {self.directory} is damaged and was not used "
                    f"({type(e).__name__}: {reason}); moved to {step}.damaged, falling back to "
                    "the one before")
                self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            target = path + ".damaged"
            n = 1
            while os.path.exists(target):
                n += 1
                target = f"{path}.damaged{n}"
            os.rename(path, target)
        self.manager.close()
        self.manager = self._manager()

    def _has(self, step: int, item: str) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step), item))

    def restore_loader_state(self, step: int) -> dict | None:
        if not self._has(step, "loader"):
            return None
        return self.manager.restore(step, args=ocp.args.Composite(
            loader=ocp.args.JsonRestore()))["loader"]

    def restore_config(self, step: int) -> dict | None:
        if not self._has(step, "config"):
            return None
        return _upgrade(self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"])

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _step_dir(path: str) -> str:
    """One checkpoint step's directory for a workdir (its latest), its checkpoints/ or a step."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")):  # one step: .../checkpoints/STEP
        return path
    root = path if os.path.basename(path) == "checkpoints" else os.path.join(path, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
    if not steps:
        raise ConfigError(f"no checkpoint in {path}: expected a training workdir, its "
                          "checkpoints/ directory, or one checkpoints/STEP directory")
    return os.path.join(root, str(steps[-1]))


def run_config_of(path: str):
    """(RunConfig, workdir) of a checkpoint: its saved config item, else WORKDIR/config.json."""
    step_dir = _step_dir(path)
    workdir = os.path.dirname(os.path.dirname(step_dir))
    for candidate in (os.path.join(step_dir, "config", "metadata"),
                      os.path.join(workdir, "config.json")):
        if os.path.exists(candidate):
            with open(candidate) as f:
                saved = _upgrade(json.load(f))
            return from_config_dict(ml_collections.ConfigDict(saved)), workdir
    raise ConfigError(f"no config found for the checkpoint {step_dir} (neither its config item "
                      f"nor {workdir}/config.json)")


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


def restore_params(path: str, abstract_params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Parameters only (for evaluation, generation, fine-tuning with another optimizer) from a
    training workdir (its latest step), its `checkpoints/` directory or one step's directory,
    into the shapes, dtypes and shardings of `abstract_params`."""
    step_dir = _step_dir(path)
    with ocp.PyTreeCheckpointer() as ckptr:
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                           dtype=a.dtype), abstract_params)
        try:
            out = ckptr.restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
                item={"params": abstract_params}, restore_args={"params": restore_args},
                partial_restore=True))
        except (ValueError, KeyError) as e:
            raise ConfigError(f"cannot restore parameters from {step_dir}: {e}") from None
    return int(os.path.basename(step_dir)), out["params"]
