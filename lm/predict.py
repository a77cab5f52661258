"""Masked-token filling with a BERT-style checkpoint (model.style 'bert', task mlm / mlm_nsp):
JSON lines in, the top 5 predictions at each asked position out; and the fine-tuning heads'
predictions (task classify / span, any style; lm.finetune). lm.generate is the decoders'.

    python -m lm.predict --checkpoint DIR --input IN.jsonl [--output OUT.jsonl] [--batch-size N]

DIR: a training workdir, its checkpoints/, one step directory, or an `lm.convert from-hf` output;
the tokenizer is the workdir's (data.json) where it has one. Each input line is one object:

    {"text": "the cat [MASK] on the mat"}           # encoded as [CLS] ... [SEP] (encode_prompt)
    {"input_ids": [2, 57, 4, 3], "positions": [2]}  # ids as they are
      optional: "token_type_ids" (one per token), "positions" (the token indices to predict;
      default: every position holding the tokenizer's [MASK])

and each output line is that object plus
    "fill": [{"position": i, "top_ids": [5 ids], "top_logits": [5 floats],
              "top_tokens": [5 strings, where there is a tokenizer]}, ...]
    (and "nsp_logits": [2 floats] where the checkpoint has the next-sentence head)
with ids the tokenizer does not have (a vocabulary padded past it) never proposed. A line that
cannot run (invalid JSON, a missing field, an id out of range, longer than model.max_len) gets
`{"error": "line N: ..."}` and the others still run; the exit status is 0 when any line ran.

A classify checkpoint reads {"text": ..., "text_pair": ... (optional)} and adds
    "label" (the most probable) and "probs": {label: probability, ...}
and a span checkpoint reads {"question": ..., "context": ...} and adds
    "answer", "start", "end" (character offsets in the context) and "score" (its probability),
with the inputs cut and windowed as in training (train.seq_len, task.doc_stride).

Rows of different lengths share a batch: right-padded to a bucket length (powers of two, at
least 16, at most model.max_len) with their `lengths` masking the padded keys, the batch padded to
--batch-size rows, and the positions to a power of two, so a run compiles a handful of shapes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import quantize
from lm.config import ConfigError
from lm.data import tokenizer as lm_tokenizer

TOP_K = 5
MIN_BUCKET = 16
NOT_AN_ENCODER = ("lm.predict fills masked tokens of a BERT-style (task mlm) checkpoint; use "
                  "lm.generate for decoders")


def load_checkpoint(path: str):
    """(run config, parameters on one device, tokenizer or None) of the newest readable step
    PATH names (a workdir, its checkpoints/, one step, an lm.convert output); any style."""
    from lm.checkpoint import load_params  # orbax is slow to import
    from lm.model import abstract_model

    def abstract_for(run):
        if run is None:
            raise ConfigError(f"no config found for the checkpoint {path} (neither its config "
                              "item nor WORKDIR/config.json)")
        _, abstract = abstract_model(run.model, run.precision, run.task)
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return quantize.for_model(run.model, jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract))

    run, workdir, _, params = load_params(path, abstract_for)
    tok = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        tok = lm_tokenizer.from_workdir(workdir)
    return run, params, tok


def mask_id(tok) -> int | None:
    if tok is None:
        return None
    if getattr(tok, "mask_id", None) is not None:
        return int(tok.mask_id)
    inner = getattr(tok, "tokenizer", None)
    return inner.token_to_id("[MASK]") if hasattr(inner, "token_to_id") else None


def token_string(tok, i: int) -> str:
    inner = getattr(tok, "tokenizer", None)
    s = inner.id_to_token(i) if hasattr(inner, "id_to_token") else None
    return s if s is not None else tok.decode([i])


def bucket(n: int, cap: int, floor: int = MIN_BUCKET) -> int:
    """The padded length of n: the next power of two >= n (at least `floor`), at most `cap`."""
    return min(cap, max(floor, 1 << max(0, n - 1).bit_length()))


class Predictor:
    """A BERT checkpoint's masked-LM top-k over batches of rows (one jit; one compile per
    (batch, length, positions) shape)."""

    def __init__(self, run, params, tokenizer=None, batch_size: int = 32):
        from lm.model import abstract_model
        self.cfg, self.tokenizer, self.batch_size = run.model, tokenizer, batch_size
        if self.cfg.style != "bert":
            raise ConfigError(f"{NOT_AN_ENCODER} (this one is model.style {self.cfg.style!r})")
        graphdef, _ = abstract_model(run.model, run.precision, run.task)
        self.params, self.mask_id = params, mask_id(tokenizer)
        # Ids past the tokenizer's vocabulary (a padded embedding) are never proposed.
        self.limit = min(self.cfg.vocab_size, tokenizer.vocab_size if tokenizer is not None
                         else self.cfg.vocab_size)
        limit, nsp = self.limit, self.cfg.nsp_head

        @jax.jit
        def top_k(params, tokens_bt, types_bt, lengths_b, positions_bp):
            model = nnx.merge(graphdef, params)
            x_btd = model.hidden(tokens_bt, token_types=types_bt, lengths=lengths_b)
            logits_bpv = model.logits(x_btd, positions_bp).astype(jnp.float32)
            logits_bpv = jnp.where(jnp.arange(logits_bpv.shape[-1]) < limit, logits_bpv,
                                   -jnp.inf)
            values, ids = jax.lax.top_k(logits_bpv, TOP_K)
            return values, ids, (model.nsp_logits(x_btd).astype(jnp.float32) if nsp else None)

        self._top_k = top_k
        self.shapes: set[tuple[int, int, int]] = set()

    @classmethod
    def from_checkpoint(cls, path: str, batch_size: int = 32):
        """A Predictor, or for a classify / span checkpoint a HeadPredictor."""
        run, params, tok = load_checkpoint(path)
        if run.task.finetune:
            from lm.finetune import Encoder
            return HeadPredictor(Encoder(run, params, tok, batch_size))
        return cls(run, params, tok, batch_size)

    def prepare(self, row) -> tuple[list[int], list[int], list[int]]:
        """(ids, token types, positions) of one input object; ValueError says what is wrong."""
        cfg, tok = self.cfg, self.tokenizer
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        if ("text" in row) == ("input_ids" in row):
            raise ValueError("give exactly one of 'text' (a string) and 'input_ids' (a list of "
                             "token ids)")
        if "text" in row:
            if not isinstance(row["text"], str):
                raise ValueError("'text' must be a string")
            if tok is None:
                raise ValueError("'text' needs a tokenizer and this checkpoint has none: give "
                                 "'input_ids'")
            ids = [int(i) for i in tok.encode_prompt(row["text"])]
        else:
            ids = _int_list(row["input_ids"], "input_ids")
            bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
            if bad:
                raise ValueError(f"input_ids: {bad[0]} is out of range [0, {cfg.vocab_size})")
        if not ids:
            raise ValueError("no tokens")
        if len(ids) > cfg.max_len:
            raise ValueError(f"{len(ids)} tokens exceed the model's max_len ({cfg.max_len})")
        types = [0] * len(ids)
        if "token_type_ids" in row:
            types = _int_list(row["token_type_ids"], "token_type_ids")
            if len(types) != len(ids):
                raise ValueError(f"token_type_ids has {len(types)} entries for {len(ids)} tokens")
            bad = [i for i in types if not 0 <= i < cfg.type_vocab_size]
            if bad:
                raise ValueError(f"token_type_ids: {bad[0]} is out of range "
                                 f"[0, {cfg.type_vocab_size})")
        if "positions" in row:
            positions = _int_list(row["positions"], "positions")
            bad = [p for p in positions if not 0 <= p < len(ids)]
            if bad:
                raise ValueError(f"positions: {bad[0]} is out of range [0, {len(ids)}) (the row "
                                 f"has {len(ids)} tokens)")
            if not positions:
                raise ValueError("positions is empty")
        elif self.mask_id is None:
            raise ValueError("no 'positions' and no tokenizer with a [MASK] token to find them: "
                             "give 'positions'")
        else:
            positions = [p for p, i in enumerate(ids) if i == self.mask_id]
            if not positions:
                raise ValueError(f"no [MASK] (id {self.mask_id}) among the tokens: mask some or "
                                 "give 'positions'")
        return ids, types, positions

    def run(self, rows: list[tuple[list[int], list[int], list[int]]]) -> list[dict]:
        """{"fill": [...]} (+ "nsp_logits") for each prepared row, in order."""
        out: list[dict | None] = [None] * len(rows)
        by_bucket: dict[int, list[int]] = {}
        for j, (ids, _, _) in enumerate(rows):
            by_bucket.setdefault(bucket(len(ids), self.cfg.max_len), []).append(j)
        for t, members in sorted(by_bucket.items()):
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                for j, result in zip(chunk, self._batch([rows[j] for j in chunk], t)):
                    out[j] = result
        return out  # type: ignore[return-value]

    def _batch(self, rows, t: int) -> list[dict]:
        b = self.batch_size
        most = max(len(r[2]) for r in rows)  # repeated positions may outnumber the tokens
        p = bucket(most, max(t, most), floor=1)
        pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
        tokens = np.full((b, t), pad if pad < self.cfg.vocab_size else 0, np.int32)
        types, positions = np.zeros((b, t), np.int32), np.zeros((b, p), np.int32)
        lengths = np.ones((b,), np.int32)  # the batch's filler rows: one (pad) token each
        for r, (ids, tt, pos) in enumerate(rows):
            tokens[r, :len(ids)], types[r, :len(ids)] = ids, tt
            lengths[r], positions[r, :len(pos)] = len(ids), pos
        self.shapes.add((b, t, p))
        values, ids, nsp = jax.device_get(self._top_k(self.params, tokens, types, lengths,
                                                      positions))
        results = []
        for r, (_, _, pos) in enumerate(rows):
            fill = []
            for k, position in enumerate(pos):
                entry = {"position": int(position), "top_ids": ids[r, k].tolist(),
                         "top_logits": [float(v) for v in values[r, k]]}
                if self.tokenizer is not None:
                    entry["top_tokens"] = [token_string(self.tokenizer, int(i))
                                           for i in ids[r, k]]
                fill.append(entry)
            result = {"fill": fill}
            if nsp is not None:
                result["nsp_logits"] = [float(v) for v in nsp[r]]
            results.append(result)
        return results


class HeadPredictor:
    """`Predictor`'s interface over a fine-tuning head (lm.finetune.Encoder)."""

    def __init__(self, encoder):
        from lm import finetune
        self.encoder, self.shapes = encoder, encoder.shapes
        self.span = encoder.task.name == "span"
        self._check = finetune.check_span if self.span else finetune.check_classify

    def prepare(self, row) -> dict:
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        self._check({**row, "answers": None} if self.span else {k: v for k, v in row.items()
                                                                 if k != "label"})
        return row

    def run(self, rows: list[dict]) -> list[dict]:
        return (self.encoder.answer if self.span else self.encoder.classify)(rows)


def _int_list(value, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                              for i in value):
        raise ValueError(f"{name!r} must be a list of integers")
    return value


def predict_lines(predictor, lines: Iterable[str]) -> tuple[list[dict], int, int]:
    """(output objects, rows filled, rows in error) for input lines (blank ones skipped)."""
    outputs: list[dict] = []
    ready, slots = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            outputs.append({"error": f"line {n}: invalid JSON ({e})"})
            continue
        try:
            ready.append(predictor.prepare(row))
        except ValueError as e:
            outputs.append({"error": f"line {n}: {e}"})
            continue
        slots.append((len(outputs), row))
        outputs.append({})
    for (k, row), result in zip(slots, predictor.run(ready)):
        outputs[k] = {**row, **result}
    return outputs, len(ready), len(outputs) - len(ready)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lm.predict", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a workdir, checkpoints/, one step "
                   "directory or an lm.convert from-hf output of a BERT-style model")
    p.add_argument("--input", required=True, help="JSON lines ('-': stdin)")
    p.add_argument("--output", help="JSON lines (default: stdout)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
        predictor = Predictor.from_checkpoint(args.checkpoint, args.batch_size)
        if args.input == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.input) as f:
                lines = f.read().splitlines()
    except (ConfigError, OSError, UnicodeDecodeError) as e:
        print(f"lm.predict: error: {e}", file=sys.stderr)
        return 2
    outputs, filled, failed = predict_lines(predictor, lines)
    text = "".join(json.dumps(o) + "\n" for o in outputs)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    print(f"lm.predict: {filled} rows filled, {failed} in error, {len(predictor.shapes)} "
          f"compiled shapes, {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0 if filled else 1


if __name__ == "__main__":
    sys.exit(main())
