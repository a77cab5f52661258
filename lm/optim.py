"""Optimizers as optax chains: learning-rate schedule, global-norm clipping, weight decay mask."""
from __future__ import annotations

import jax
import optax

from lm.config import OptimConfig
from lm.model import VECTOR_PARAMS


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio`."""
    decay = cfg.decay_steps or total_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(decay, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params):
    """Weight decay on weight matrices and embeddings only, never on biases or norm scales.

    Decided by parameter name, not rank: stacking layers adds an axis to every per-layer vector.
    """
    def decays(path, _):
        names = [getattr(k, "key", None) for k in path]
        return not any(n in VECTOR_PARAMS for n in names)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    lr = schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.name == "adamw":
        parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, mask=decay_mask))
    else:  # validated in lm.config
        raise ValueError(f"optim.name={cfg.name!r}")
    return optax.chain(*parts)
