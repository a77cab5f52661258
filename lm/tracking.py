"""Where metrics go: JSONL, TensorBoard and a progress bar, written by process 0 only.

The jitted step returns metrics as arrays; the host decides when to fetch and log them. A
metric may be None (JSON null; left out of TensorBoard): MFU where the device's peak is unknown.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

# The metrics the progress bar shows, and how.
SHOWN = {"loss": "{:.4g}", "eval_loss": "{:.4g}", "tokens_per_s": "{:.4g}", "mfu": "{:.1%}"}


class Tracker:
    """log(step, metrics) / log_hparams(config) / finish(); no-ops on processes other than 0."""

    def __init__(self, workdir: str, total_steps: int, progress: bool = True):
        self.active = jax.process_index() == 0
        self.bar = None
        self.shown: dict[str, str] = {}
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))
        if progress:
            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, mininterval=1.0)

    def log_hparams(self, config: dict[str, Any], workdir: str) -> None:
        if not self.active:
            return
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        self.tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        known = {k: v for k, v in metrics.items() if v is not None}
        for key, value in known.items():
            self.tb.add_scalar(key, value, step)
        if self.bar is not None:
            self.shown.update({k: SHOWN[k].format(v) for k, v in known.items() if k in SHOWN})
            self.bar.set_postfix(self.shown, refresh=False)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def write(self, text: str) -> None:
        """Prints above the progress bar (process 0 only)."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def finish(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.tb.close()
        self.jsonl.close()
