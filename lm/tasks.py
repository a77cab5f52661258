"""What a run trains (`task.name`): the decoders' next-token loss, or BERT's masked-LM objectives.

    lm       a [B, T + 1] array of token ids; the mean next-token cross-entropy
    mlm      a dict batch: `tokens` [B, T], `token_types` [B, T], `lengths` [B] (right padding);
             the masked-LM cross-entropy, averaged over the predicted tokens of the whole batch
    mlm_nsp  mlm's batch + `nsp_labels` [B] (0: B follows A, 1: a random B); the objective is
             the masked-LM loss + the next-sentence loss (BERT's pretraining loss), `loss` the
             masked-LM part

Masking is dynamic and runs on the device, inside the jitted step, from a key that is a function
of (train.seed, step) alone (`step_key`): the masks of a step are the same after a resume, on any
mesh and with any train.microbatches (the whole step's batch is masked before it is split). As in
Google's BERT, a sequence predicts n = clip(round(mask_prob * candidates), 1, max_predictions) of
its candidate tokens (not [CLS], [SEP] or padding), chosen uniformly (`whole_word_mask`: whole
words, a word and its "##" pieces), 80% of them replaced by [MASK], 10% by a random token, 10%
kept. Predictions live in fixed-size [B, P] arrays (P = max_predictions), weighted 0 where a
sequence predicts fewer.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.config import TaskConfig


@dataclasses.dataclass(frozen=True)
class Masking:
    """The token ids masking needs (the tokenizer's; defaults: lm's WordPiece layout, ids 0-4),
    how many ids a random replacement draws from (the tokenizer's vocabulary, which a padded
    model vocabulary may exceed), and for whole-word masking which ids continue a word."""
    vocab: int
    pad: int = 0
    cls: int = 2
    sep: int = 3
    mask: int = 4
    continuation: tuple[int, ...] = ()  # ids of "##" pieces (whole-word masking)

    @classmethod
    def of(cls, tokenizer, model_vocab: int) -> "Masking":
        """From an lm.data tokenizer with cls/sep/mask ids (ValueError naming what is missing)."""
        missing = [n for n in ("cls_id", "sep_id", "mask_id", "pad_id")
                   if getattr(tokenizer, n, None) is None]
        if missing:
            raise ValueError(f"a masked-LM task needs a tokenizer with [CLS], [SEP], [MASK] and "
                             f"[PAD] tokens; this one has no {', '.join(missing)} (prepare the "
                             "data with --wordpiece-vocab-size, or data.tokenizer 'wordpiece:N')")
        table = np.asarray(tokenizer.continuation_table())
        return cls(vocab=min(tokenizer.vocab_size, model_vocab), pad=tokenizer.pad_id,
                   cls=tokenizer.cls_id, sep=tokenizer.sep_id, mask=tokenizer.mask_id,
                   continuation=tuple(int(i) for i in np.flatnonzero(table)))


def predictions(task: TaskConfig, seq_len: int) -> int:
    """P: the predicted positions per sequence."""
    return task.max_predictions or seq_len


def step_key(seed: int, step, stream: int) -> jax.Array:
    """The masking key of `step` (a traced int is fine) in `stream` (1: training, 2: eval)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), step)


def mask_batch(batch: dict, key: jax.Array, task: TaskConfig, m: Masking) -> dict:
    """`batch` with its tokens masked, plus `mlm_positions` [B, P] int32, `mlm_targets` [B, P]
    (the original ids) and `mlm_weights` [B, P] float32 (1 where a position is predicted)."""
    tokens, lengths = batch["tokens"], batch["lengths"]
    b, t = tokens.shape
    p = predictions(task, t)
    k_choose, k_how, k_random = jax.random.split(key, 3)
    pos = jnp.arange(t)[None, :]
    candidate = ((pos < lengths[:, None]) & (tokens != m.cls) & (tokens != m.sep) &
                 (tokens != m.pad))
    u = jax.random.uniform(k_choose, (b, t))
    word_start = pos
    if task.whole_word_mask and m.continuation:
        continues = jnp.isin(tokens, jnp.asarray(m.continuation)) & candidate
        # each piece takes its word's first token's draw, so a word is chosen whole
        word_start = jax.lax.cummax(jnp.where(continues, 0, pos), axis=1)
        u = jnp.take_along_axis(u, word_start, axis=1)
    # rank of each token in its row's draw order (candidates first); ties keep words together
    order = jnp.argsort(jnp.where(candidate, u, 2.0), axis=1, stable=True)
    rank = jnp.zeros_like(order).at[jnp.arange(b)[:, None], order].set(
        jnp.broadcast_to(jnp.arange(t), (b, t)))
    n = jnp.clip(jnp.round(task.mask_prob * candidate.sum(axis=1)), 1, p).astype(jnp.int32)
    if task.whole_word_mask and m.continuation:
        # a word is chosen only if all its pieces fit in n (Google skips a word that overflows)
        last = jax.ops.segment_max(rank.ravel(), (word_start + t * jnp.arange(b)[:, None]).ravel(),
                                   num_segments=b * t).reshape(b, t)
        chosen = candidate & (jnp.take_along_axis(last, word_start, axis=1) < n[:, None])
    else:
        chosen = candidate & (rank < n[:, None])
    _, positions = jax.lax.top_k(jnp.where(chosen, -rank, -2 * t), p)  # chosen first, in order
    weights = jnp.take_along_axis(chosen, positions, axis=1)
    targets = jnp.take_along_axis(tokens, positions, axis=1)
    how = jax.random.uniform(k_how, (b, p))
    random_ids = jax.random.randint(k_random, (b, p), 0, m.vocab, tokens.dtype)
    new = jnp.where(how < 0.8, m.mask, jnp.where(how < 0.9, random_ids, targets))
    rows = jnp.arange(b)[:, None]
    # unchosen slots write their own token back (several may point at one position)
    masked = tokens.at[rows, positions].set(jnp.where(weights, new, targets))
    return batch | {"tokens": masked, "mlm_positions": positions.astype(jnp.int32),
                    "mlm_targets": targets, "mlm_weights": weights.astype(jnp.float32)}


def xent(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """[B, T] float32 cross-entropies of [B, T, V] logits (the "loss" scope of a profile)."""
    with jax.named_scope("loss"):
        return optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32),
                                                                targets_bt)


def encoder_inputs(batch: dict) -> dict:
    """The keyword arguments of `Transformer.hidden` in a masked-LM batch."""
    return {"token_types": batch["token_types"], "lengths": batch["lengths"]}


def mlm_sums(logits_bpv: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(sum of the predicted tokens' cross-entropies, how many of them are right)."""
    w = batch["mlm_weights"]
    loss = (xent(logits_bpv, batch["mlm_targets"]) * w).sum()
    right = ((jnp.argmax(logits_bpv, -1) == batch["mlm_targets"]) * w).sum()
    return loss, right


def nsp_terms(logits_b2: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(mean next-sentence cross-entropy, how many rows are right)."""
    labels = batch["nsp_labels"]
    loss = xent(logits_b2[:, None], labels[:, None]).mean()
    return loss, (jnp.argmax(logits_b2, -1) == labels).sum()
