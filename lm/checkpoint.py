"""Orbax checkpoints under WORKDIR/checkpoints: per step, the train state ({"step", "params",
"opt_state"}, item `state`) and the data loader's state (item `loader`, JSON), which is what lets
a resumed run see exactly the batches an unbroken run would have seen.

Orbax writes each step into a temporary directory and renames it when complete, so a crash never
leaves a half-written step that `latest_step` would pick up.
"""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 2):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def save(self, step: int, state: dict[str, Any], loader_state: dict | None = None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if loader_state is not None:
            items["loader"] = ocp.args.JsonSave(loader_state)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state: dict[str, Any]) -> dict[str, Any]:
        """Restores `step` into the shapes, dtypes and shardings of `abstract_state`."""
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]

    def restore_loader_state(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            loader=ocp.args.JsonRestore()))["loader"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
