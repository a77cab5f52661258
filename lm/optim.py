"""Optimizers, learning-rate schedules and dynamic loss scaling.

Optimizers are optax chains (`optim.name`), each after optional global-norm clipping
(`optim.clip_norm`):

    adamw   Adam moments with bias correction, decoupled weight decay
    lamb    Adam moments, decoupled weight decay, then the layer-wise trust ratio
            ||p|| / ||u|| (1 where either is 0; one ratio per layer of the stacked blocks)
            — You et al. 2019
    nvlamb  NVIDIA's LAMB: the same after a global gradient-norm pre-normalisation
            g / max(1, ||g|| / clip_norm) that is not optional (clip_norm > 0)
    lars    weight decay added to the gradient, trust ratio coeff * ||p|| / ||g + wd p|| on
            matrices, then heavy-ball momentum — You et al. 2017
    sgd     weight decay added to the gradient, heavy-ball (or Nesterov) momentum

Weight decay never touches biases and norm scales (`decay_mask`, by parameter name); LARS
leaves them out of the trust ratio too.

Dynamic loss scaling (`LossScale`, Megatron's DynamicGradScaler semantics; docs/numerics.md):
the loss is multiplied by `scale` before differentiation and the
gradients divided by it after; a step whose gradients are not finite is skipped (the train step
keeps parameters and optimizer state) and counts against `hysteresis`; once hysteresis is spent
the scale is multiplied by `backoff_factor` (not below `min_scale`) at each overflow; after
`growth_interval` clean steps in a row it grows by `growth_factor` and hysteresis refills.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from lm.config import OptimConfig, PrecisionConfig
from lm.model import VECTOR_PARAMS


def schedule(cfg: OptimConfig, total_steps: int, start: int = 0) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then `cfg.schedule`: cosine or linear
    decay to `lr * min_lr_ratio` at `decay_steps` (0: the end of training), constant, inverse
    square root (lr * sqrt(warmup / step)), or NVIDIA's BERT 'poly', lr (1 - step /
    decay_steps)^poly_power (to 0; not renormalized after the warmup, as NVIDIA's
    PolyWarmUpScheduler). Steps count from `start` (train.phase_start: a phase's schedule
    starts over), and decay_steps / total_steps are counted from there too."""
    peak, warmup = cfg.lr, cfg.warmup_steps
    end = peak * cfg.min_lr_ratio
    decay_end = max(cfg.decay_steps or total_steps - start, warmup + 1)

    def lr(step):
        step = jnp.maximum(jnp.asarray(step, jnp.float32) - start, 0.0)
        warm = peak * step / max(warmup, 1)
        frac = jnp.clip((step - warmup) / (decay_end - warmup), 0.0, 1.0)
        if cfg.schedule == "cosine":
            after = end + (peak - end) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
        elif cfg.schedule == "linear":
            after = peak + (end - peak) * frac
        elif cfg.schedule == "poly":
            after = peak * (1 - jnp.clip(step / decay_end, 0.0, 1.0)) ** cfg.poly_power
        elif cfg.schedule == "constant":
            after = jnp.full_like(step, peak)
        else:  # inverse_sqrt (validated in lm.config)
            after = peak * jnp.sqrt(max(warmup, 1) / jnp.maximum(step, max(warmup, 1)))
        return jnp.where(step < warmup, warm, after)

    return lr


def scale_lr(base_lr: float, base_batch: int, batch: int, rule: str = "linear") -> float:
    """The learning rate for `batch` given one tuned at `base_batch`: 'linear' (Goyal et al.,
    SGD / LARS) or 'sqrt' (Adam / LAMB, Hoffer et al.; You et al.). For configs."""
    if rule == "linear":
        return base_lr * batch / base_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(batch / base_batch)
    raise ValueError(f"batch-size scaling rule must be 'linear' or 'sqrt', got {rule!r}")


def decay_mask(params):
    """Weight decay on weight matrices and embeddings only, never on biases or norm scales.

    Decided by parameter name, not rank: stacking layers adds an axis to every per-layer vector.
    """
    def decays(path, _):
        names = [getattr(k, "key", None) for k in path]
        return not any(n in VECTOR_PARAMS for n in names)
    return jax.tree_util.tree_map_with_path(decays, params)


def scale_by_trust_ratio(trust_coefficient: float = 1.0,
                         eps: float = 0.0) -> optax.GradientTransformation:
    """u * coeff * ||p|| / (||u|| + eps) per layer (1 where either norm is 0).

    Like optax's, except that the stacked block parameters ([layers, ...], under `blocks`) get
    one ratio per layer: optax's would take one norm over all layers at once."""
    def update(updates, state, params):
        def scale(path, u, p):
            stacked = any(getattr(k, "key", None) == "blocks" for k in path) and u.ndim > 1
            axes = tuple(range(1, u.ndim)) if stacked else None
            norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axes,
                                              keepdims=True))
            p_norm, u_norm = norm(p), norm(u)
            ratio = jnp.where((p_norm == 0) | (u_norm == 0), 1.0,
                              trust_coefficient * p_norm / (u_norm + eps))
            return (u * ratio).astype(u.dtype)
        return jax.tree_util.tree_map_with_path(scale, updates, params), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg: OptimConfig, total_steps: int, start: int = 0
                   ) -> optax.GradientTransformation:
    """The optimizer of `cfg` with `schedule(cfg, total_steps, start)`."""
    lr = schedule(cfg, total_steps, start)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    wd = cfg.weight_decay
    if cfg.name == "adamw":
        parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd,
                                 mask=decay_mask))
    elif cfg.name in ("lamb", "nvlamb"):  # nvlamb: clip_norm > 0 is enforced by lm.config
        parts += [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
                  optax.add_decayed_weights(wd, decay_mask),
                  scale_by_trust_ratio(),
                  optax.scale_by_learning_rate(lr)]
    elif cfg.name == "lars":
        parts += [optax.add_decayed_weights(wd, decay_mask),
                  optax.masked(scale_by_trust_ratio(cfg.trust_coefficient, cfg.eps), decay_mask),
                  optax.scale_by_learning_rate(lr),
                  optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov)]
    elif cfg.name == "sgd":
        parts += [optax.add_decayed_weights(wd, decay_mask),
                  optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov)]
    else:  # validated in lm.config
        raise ValueError(f"optim.name={cfg.name!r}")
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# Dynamic loss scaling


class LossScale:
    """The loss-scale state is a dict of scalars that lives in the train state (and so in every
    checkpoint): `scale`, `good_steps` (clean steps since the last growth or overflow),
    `hysteresis` (overflows left before backing off) and `skipped` (steps skipped so far)."""

    def __init__(self, cfg: PrecisionConfig, dynamic: bool):
        self.cfg, self.dynamic = cfg, dynamic

    def init(self) -> dict[str, jax.Array]:
        scale = self.cfg.initial_scale if self.dynamic else 1.0
        return {"scale": jnp.asarray(scale, jnp.float32),
                "good_steps": jnp.zeros((), jnp.int32),
                "hysteresis": jnp.asarray(self.cfg.hysteresis, jnp.int32),
                "skipped": jnp.zeros((), jnp.int32)}

    def update(self, state: dict[str, jax.Array], finite: jax.Array) -> dict[str, jax.Array]:
        """The state after a step whose gradients were (not) all finite."""
        skipped = state["skipped"] + (~finite).astype(jnp.int32)
        if not self.dynamic:
            return {**state, "skipped": skipped}
        c = self.cfg
        good = jnp.where(finite, state["good_steps"] + 1, 0)
        grow = good >= c.growth_interval
        hysteresis = jnp.where(finite, state["hysteresis"], state["hysteresis"] - 1)
        back_off = ~finite & (hysteresis <= 0)
        scale = jnp.where(grow, state["scale"] * c.growth_factor,
                          jnp.where(back_off, jnp.maximum(state["scale"] * c.backoff_factor,
                                                          c.min_scale), state["scale"]))
        return {"scale": scale, "good_steps": jnp.where(grow, 0, good),
                "hysteresis": jnp.where(grow, c.hysteresis, hysteresis), "skipped": skipped}


def all_finite(tree) -> jax.Array:
    """True when every element of every leaf is finite (a global reduction under SPMD)."""
    return jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]).all()
