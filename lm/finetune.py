"""Fine-tuning on labelled data: `task.name` classify (sequence / sequence-pair classification)
and span (SQuAD-style extractive question answering), for BERT and the decoders alike.

    python -m lm.train --config configs/finetune.py:classify --workdir W \\
        --config.train.init_from=PRETRAINED --config.data.path=TRAIN.jsonl \\
        --config.data.eval_path=DEV.jsonl

With train.init_from the model section is the pretrained checkpoint's (its shape keys need not be
repeated; the fine-tuning config keeps only model.EXECUTION_KEYS), and so is the tokenizer; the
parameters the checkpoint holds are restored, the new head is initialised, the pretraining heads
are dropped. JSON lines, one example each (docs/finetuning.md):

    classify  {"text": str, "text_pair": str (optional), "label": str or int}
    span      SQuAD v1.1: {"id", "context", "question",
                           "answers": {"text": [str, ...], "answer_start": [int, ...]}}

A row that does not have this form is skipped and reported with its file and line; a label the
run does not know (task.labels, else the training file's) is an error naming it. Encoding:

- classify: `[CLS] text [SEP] (text_pair [SEP])` with token types 0 / 1 where the tokenizer has
  BERT's specials (a decoder's: `text (eod text_pair)`), cut longest-first to train.seq_len.
- span: `[CLS] question [SEP] window [SEP]` (a decoder's: `question eod window`), the question
  cut to task.max_query_len, a long context split into windows whose starts are
  task.doc_stride tokens apart (Google's BERT); a window that does not hold the whole answer is
  labelled at position 0, as in Google's and Hugging Face's SQuAD v1 training. Prediction takes
  the best start/end pair (end >= start, at most task.max_answer_len tokens, inside the context)
  over all windows of an example and maps it back to character offsets of the context.

Metrics (eval records, metrics.jsonl and TensorBoard): classify `eval_loss`, `eval_accuracy` and
`eval_f1` (macro over the labels that occur, as scikit-learn's) as fractions; span `eval_loss`,
`eval_exact` and `eval_f1` in percent with SQuAD's answer normalisation (its official script).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import ConfigError, ModelConfig, RunConfig
from lm.data import tokenizer as lm_tokenizer
from lm.data.loader import BertLoader, Loader
from lm.tasks import xent

N_BEST = 20  # start and end candidates per window (Google's n_best_size)
REPORTED_BAD_ROWS = 5


# ---------------------------------------------------------------------------------------------
# Rows


def read_rows(path: str, check) -> tuple[list[tuple[int, dict]], list[str]]:
    """(the (line, row) pairs that `check(row)` accepts, the problems of the others as
    'FILE:LINE: why'); blank lines are skipped. `check` raises ValueError saying what is
    wrong."""
    good, bad = [], []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read labelled data {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            check(row)
        except ValueError as e:  # json.JSONDecodeError is one
            bad.append(f"{path}:{n}: {e}")
            continue
        good.append((n, row))
    return good, bad


def check_classify(row: dict) -> None:
    if not isinstance(row.get("text"), str):
        raise ValueError("'text' must be a string")
    if row.get("text_pair") is not None and not isinstance(row["text_pair"], str):
        raise ValueError("'text_pair' must be a string (or absent)")
    if "label" in row and not _label_ok(row["label"]):
        raise ValueError(f"'label' must be a string or an integer, got {row['label']!r}")


def check_span(row: dict) -> None:
    for name in ("context", "question"):
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise ValueError(f"{name!r} must be a non-empty string")
    if not isinstance(row.get("id", ""), (str, int)):
        raise ValueError("'id' must be a string or an integer")
    answers = row.get("answers")
    if answers is None:
        return
    texts, starts = (answers.get("text"), answers.get("answer_start")) if isinstance(
        answers, dict) else (None, None)
    if not (isinstance(texts, list) and isinstance(starts, list) and len(texts) == len(starts)
            and texts and all(isinstance(t, str) and t for t in texts)
            and all(isinstance(s, int) and not isinstance(s, bool) for s in starts)):
        raise ValueError("'answers' must be {\"text\": [non-empty strings], \"answer_start\": "
                         "[integers]} of the same length >= 1")
    for t, s in zip(texts, starts):
        if row["context"][s:s + len(t)] != t:
            raise ValueError(f"answer {t!r} is not at character {s} of the context")


def _label_ok(x) -> bool:
    return isinstance(x, (str, int)) and not isinstance(x, bool)


def label_list(rows: list[tuple[int, dict]]) -> list:
    """The distinct labels of labelled rows, sorted (integers before strings)."""
    return sorted({r["label"] for _, r in rows}, key=lambda x: (isinstance(x, str), x))


# ---------------------------------------------------------------------------------------------
# Encoding


def pieces(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (no special tokens) and each token's character span in it."""
    inner = getattr(tok, "tokenizer", None)
    if inner is not None:  # a Hugging Face `tokenizers` model: its offsets are characters
        e = inner.encode(text, add_special_tokens=False)
        return list(e.ids), [tuple(o) for o in e.offsets]
    ids, spans = [], []
    for c, ch in enumerate(text):  # the byte tokenizer: every byte of a character spans it
        for b in ch.encode("utf-8"):
            ids.append(b)
            spans.append((c, c + 1))
    return ids, spans


def _specials(tok) -> tuple[int | None, int]:
    """([CLS] or None, the separator: [SEP], else the end-of-document token)."""
    cls_id = getattr(tok, "cls_id", None)
    sep_id = getattr(tok, "sep_id", None)
    return (cls_id, sep_id) if cls_id is not None and sep_id is not None else (None, tok.eod_id)


def assemble(tok, first: list[int], second: list[int] | None) -> tuple[list[int], list[int]]:
    """(ids, token types) of one or two segments: `[CLS] a [SEP] (b [SEP])`, or `a (eod b)`."""
    cls_id, sep = _specials(tok)
    if cls_id is None:
        ids = first + ([sep] + second if second is not None else [])
        return ids, [0] * len(first) + [1] * (len(ids) - len(first))
    a = [cls_id] + first + [sep]
    b = second + [sep] if second is not None else []
    return a + b, [0] * len(a) + [1] * len(b)


def overhead(tok, pair: bool) -> int:
    """Special tokens `assemble` adds."""
    return (3 if pair else 2) if _specials(tok)[0] is not None else int(pair)


def encode_classify(tok, text: str, pair: str | None, seq_len: int) -> tuple[list, list]:
    """(ids, token types) of a classify row, cut longest-first to seq_len tokens."""
    a = pieces(tok, text)[0]
    b = pieces(tok, pair)[0] if pair is not None else None
    budget = seq_len - overhead(tok, b is not None)
    while len(a) + len(b or []) > budget:
        if b is not None and len(b) > len(a):
            b.pop()
        else:
            a.pop()
    return assemble(tok, a, b)


@dataclasses.dataclass
class Window:
    """One model input of a span example: its tokens, and where its context part lies."""
    ids: list[int]
    types: list[int]
    example: int  # index of the example
    prefix: int  # tokens before the context part
    start: int  # the first context token it holds
    size: int  # context tokens it holds


def span_windows(tok, question: str, context_ids: list[int], example: int, task, seq_len: int
                 ) -> list[Window]:
    """The windows of one example (module docstring), at least one."""
    q = pieces(tok, question)[0][:task.max_query_len]
    room = seq_len - len(q) - overhead(tok, True)
    if room < 1:
        raise ConfigError(f"train.seq_len ({seq_len}) leaves no room for a context after a "
                          f"question of {len(q)} tokens (task.max_query_len "
                          f"{task.max_query_len}): raise seq_len or lower max_query_len")
    windows, start = [], 0
    while True:
        size = min(room, len(context_ids) - start)
        ids, types = assemble(tok, q, context_ids[start:start + size])
        prefix = len(q) + (2 if _specials(tok)[0] is not None else 1)  # [CLS] q [SEP] / q eod
        windows.append(Window(ids, types, example, prefix, start, size))
        if start + size >= len(context_ids):
            return windows
        start += min(size, task.doc_stride)


def answer_tokens(spans: list[tuple[int, int]], char_start: int, char_end: int
                  ) -> tuple[int, int]:
    """(first, last) context token covering the characters [char_start, char_end)."""
    first = next(i for i, (_, e) in enumerate(spans) if e > char_start)
    last = max(i for i, (s, _) in enumerate(spans) if s < char_end)
    return first, max(first, last)


# ---------------------------------------------------------------------------------------------
# Features: the arrays a loader serves


@dataclasses.dataclass
class Split:
    """One file's examples encoded: `features` (equal-length arrays, one row per model input)
    and, for span, what maps the windows back to the examples."""
    path: str
    features: dict[str, np.ndarray]
    rows: list[dict]  # the accepted rows, in order
    windows: list[Window] = dataclasses.field(default_factory=list)
    spans: list[list[tuple[int, int]]] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.features["lengths"].sum())


def _pad(rows_ids: list[list[int]], rows_types: list[list[int]], seq_len: int, pad: int
         ) -> dict[str, np.ndarray]:
    tokens = np.full((len(rows_ids), seq_len), pad, np.int32)
    types = np.zeros((len(rows_ids), seq_len), np.int32)
    for r, (ids, tt) in enumerate(zip(rows_ids, rows_types)):
        tokens[r, :len(ids)], types[r, :len(tt)] = ids, tt
    return {"tokens": tokens, "token_types": types,
            "lengths": np.array([len(x) for x in rows_ids], np.int32)}


def classify_split(path: str, rows, tok, labels: list, seq_len: int) -> Split:
    index = {label: i for i, label in enumerate(labels)}
    for n, r in rows:
        if r.get("label") not in index:
            raise ConfigError(f"{path}:{n}: label {r.get('label')!r} is not one of the run's "
                              f"labels {labels} (task.labels, else the training file's)")
    encoded = [encode_classify(tok, r["text"], r.get("text_pair"), seq_len) for _, r in rows]
    features = _pad([e[0] for e in encoded], [e[1] for e in encoded], seq_len, tok.pad_id)
    features["labels"] = np.array([index[r["label"]] for _, r in rows], np.int32)
    return Split(path, features, [r for _, r in rows])


def span_split(path: str, rows, tok, task, seq_len: int) -> Split:
    windows, spans = [], []
    starts, ends = [], []
    for e, (_, r) in enumerate(rows):
        ids, offsets = pieces(tok, r["context"])
        spans.append(offsets)
        answer = None
        if r.get("answers") and ids:
            s = r["answers"]["answer_start"][0]
            answer = answer_tokens(offsets, s, s + len(r["answers"]["text"][0]))
        for w in span_windows(tok, r["question"], ids, e, task, seq_len):
            windows.append(w)
            inside = answer is not None and w.start <= answer[0] and answer[1] < w.start + w.size
            starts.append(w.prefix + answer[0] - w.start if inside else 0)
            ends.append(w.prefix + answer[1] - w.start if inside else 0)
    features = _pad([w.ids for w in windows], [w.types for w in windows], seq_len, tok.pad_id)
    features["start_positions"] = np.array(starts, np.int32)
    features["end_positions"] = np.array(ends, np.int32)
    return Split(path, features, [r for _, r in rows], windows, spans)


# ---------------------------------------------------------------------------------------------
# The run's data


@dataclasses.dataclass
class LabelledData:
    """What lm.train needs of a fine-tuning run's data (as of a prepared `Dataset`)."""
    path: str
    fingerprint: str
    tokenizer: Any
    train: Split
    eval: Split | None

    def num_tokens(self, split: str) -> int:
        return self.train.num_tokens if split == "train" else (
            self.eval.num_tokens if self.eval else 0)


def prepare(run: RunConfig, log) -> tuple[RunConfig, LabelledData]:
    """The run as it will train (model section and tokenizer from train.init_from's checkpoint,
    task.labels and num_labels from the data) and its encoded data. Reports skipped rows
    through `log`."""
    t, k = run.train, run.task
    if not run.data.path:
        raise ConfigError(f"'data.path' must name the labelled training JSONL for task.name "
                          f"{k.name!r} (docs/finetuning.md)")
    tok, model = _pretrained(run)
    if model is not None:
        run = dataclasses.replace(run, model=model)
    check = check_classify if k.name == "classify" else check_span
    train_rows, bad = read_rows(run.data.path, check)
    eval_rows, eval_bad = read_rows(run.data.eval_path, check) if run.data.eval_path else ([], [])
    for path, problems in ((run.data.path, bad), (run.data.eval_path, eval_bad)):
        if problems:
            log(f"{path}: {len(problems)} bad row{'s' * (len(problems) > 1)} skipped: " +
                "; ".join(problems[:REPORTED_BAD_ROWS]) +
                (" ..." if len(problems) > REPORTED_BAD_ROWS else ""))
    if not train_rows:
        raise ConfigError(f"data.path {run.data.path}: no usable rows ({len(bad)} bad)")
    if k.name == "classify":
        missing = [f"{run.data.path}:{n}" for n, r in train_rows if "label" not in r]
        if missing:
            raise ConfigError(f"training rows need a 'label': {', '.join(missing[:5])}")
        labels = k.label_list or label_list(train_rows)
        run = dataclasses.replace(run, task=dataclasses.replace(
            k, labels=json.dumps(labels), num_labels=len(labels)))
    if run.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"'model.vocab_size' ({run.model.vocab_size}) is smaller than the "
                          f"tokenizer's vocabulary ({tok.vocab_size})")
    if t.seq_len > run.model.max_len:
        raise ConfigError(f"train.seq_len ({t.seq_len}) must be <= model.max_len "
                          f"({run.model.max_len}) of the pretrained model")

    def split(path, rows):
        if run.task.name == "classify":
            return classify_split(path, rows, tok, run.task.label_list, t.seq_len)
        return span_split(path, rows, tok, run.task, t.seq_len)

    data = LabelledData(run.data.path, _fingerprint(run, tok), tok, split(run.data.path,
                                                                          train_rows),
                        split(run.data.eval_path, eval_rows) if eval_rows else None)
    return run, data


def _pretrained(run: RunConfig) -> tuple[Any, ModelConfig | None]:
    """(tokenizer, model section or None): train.init_from's (its workdir's tokenizer, its run
    config's model section with this run's execution keys), else data.tokenizer and the
    config's own model section."""
    from lm.checkpoint import checkpoint_config
    if not run.train.init_from:
        spec = run.data.tokenizer
        try:
            return lm_tokenizer.load(spec), None
        except ValueError as e:
            raise ConfigError(f"'data.tokenizer' for fine-tuning without train.init_from must "
                              f"be 'bytes' or a tokenizer.json path: {e}") from None
    saved, workdir = checkpoint_config(run.train.init_from)
    if saved is None:
        raise ConfigError(f"train.init_from {run.train.init_from}: no run config found (neither "
                          "a checkpoint's config item nor WORKDIR/config.json)")
    from lm.config import from_config_dict
    import ml_collections
    pretrained = from_config_dict(ml_collections.ConfigDict(saved)).model
    model = dataclasses.replace(pretrained, **{k: getattr(run.model, k)
                                               for k in ModelConfig.EXECUTION_KEYS})
    try:
        tok = lm_tokenizer.from_workdir(workdir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.init_from {run.train.init_from}: no tokenizer ({e})") from None
    return tok, model


def _fingerprint(run: RunConfig, tok) -> str:
    h = hashlib.sha256()
    for path in (run.data.path, run.data.eval_path):
        if path:
            with open(path, "rb") as f:
                h.update(f.read())
    h.update(json.dumps([tok.spec(), run.train.seq_len, run.task.name, run.task.labels,
                         run.task.max_query_len, run.task.doc_stride]).encode())
    return h.hexdigest()[:16]


class LabelledLoader(Loader):
    """Batches of a Split's feature rows in `Loader`'s order, state and sharding (a shuffled
    epoch after epoch; the tail of an epoch rolls over). `eval`: rows in order, the last batch
    padded with rows of weight 0 (`weights`)."""

    def __init__(self, split: Split, task: str, batch_size: int, seed: int, sharding=None,
                 shuffle: bool = True, prefetch: int = 0, fingerprint: str = "",
                 pad_to_batch: bool = False):
        self.task = task
        features = dict(split.features)
        n = len(features["lengths"])
        features["weights"] = np.ones(n, np.float32)
        if pad_to_batch and n % batch_size:
            extra = batch_size - n % batch_size
            features = {k: np.concatenate([v, np.zeros((extra,) + v.shape[1:], v.dtype)])
                        for k, v in features.items()}
            features["lengths"][n:] = 1
        self.features, self.real = features, n
        super().__init__(range(len(features["lengths"])), batch_size,
                         features["tokens"].shape[1], seed, sharding, shuffle, prefetch,
                         fingerprint, os.path.basename(split.path))

    def _num_sequences(self, rows: int) -> int:
        return rows

    def _too_small(self, split: str, rows: int) -> str:
        return (f"{split} holds {rows} model inputs, fewer than one batch of {self.batch_size}: "
                "lower train.batch_size or add rows")

    def global_batch(self, state=None, rows=None) -> dict[str, np.ndarray]:
        ids = self.sequence_ids(self.state if state is None else state)
        ids = ids if rows is None else ids[rows]
        return {k: v[ids] for k, v in self.features.items()}

    batch_at = BertLoader.batch_at

    def state_dict(self) -> dict:
        return {**super().state_dict(), "task": self.task}


def loaders(run: RunConfig, data: LabelledData, batch_sharding) -> tuple[Loader, Loader | None]:
    t = run.train
    try:
        train = LabelledLoader(data.train, run.task.name, t.batch_size, t.seed, batch_sharding,
                               shuffle=run.data.shuffle, prefetch=run.data.prefetch,
                               fingerprint=data.fingerprint)
        evals = None if data.eval is None else LabelledLoader(
            data.eval, run.task.name, t.batch_size, t.seed, batch_sharding, shuffle=False,
            pad_to_batch=True)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    return train, evals


# ---------------------------------------------------------------------------------------------
# The heads' losses and outputs (inside the jitted steps)


def head_outputs(model, batch: dict, pipeline=None) -> dict[str, jax.Array]:
    """The fine-tuning head's float32 logits of a batch: `logits` [B, C] (classify) or
    `start` / `end` [B, T] (span; positions past a row's length at -1e9)."""
    x_btd = model.hidden(batch["tokens"], pipeline=pipeline, token_types=batch["token_types"],
                         lengths=batch["lengths"])
    if "labels" in batch:
        return {"logits": model.class_logits(x_btd, batch["lengths"])}
    logits = model.span_logits(x_btd)
    real = jnp.arange(logits.shape[1])[None, :] < batch["lengths"][:, None]
    logits = jnp.where(real[..., None], logits, -1e9)
    return {"start": logits[..., 0], "end": logits[..., 1]}


def head_loss(out: dict, batch: dict) -> jax.Array:
    """The mean cross-entropy of the rows (span: of start and end, halved, as Hugging Face)."""
    if "logits" in out:
        return xent(out["logits"][:, None], batch["labels"][:, None]).mean()
    return (xent(out["start"][:, None], batch["start_positions"][:, None]).mean() +
            xent(out["end"][:, None], batch["end_positions"][:, None]).mean()) / 2


# ---------------------------------------------------------------------------------------------
# Metrics and answers (on the host)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def classify_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """eval_loss, eval_accuracy and macro eval_f1 of [N, C] logits against [N] label ids."""
    pred = logits.argmax(-1)
    f1s = []
    for c in np.union1d(labels, pred):
        tp = np.sum((pred == c) & (labels == c))
        fp, fn = np.sum((pred == c) & (labels != c)), np.sum((pred != c) & (labels == c))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    loss = -_log_softmax(logits)[np.arange(len(labels)), labels].mean()
    return {"eval_loss": float(loss), "eval_accuracy": float((pred == labels).mean()),
            "eval_f1": float(np.mean(f1s))}


def normalize_answer(s: str) -> str:
    """SQuAD's: lower case, no punctuation, no articles (a, an, the), single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def answer_f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if not p or not g:
        return float(p == g)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def best_answers(split: Split, start: np.ndarray, end: np.ndarray, max_answer_len: int
                 ) -> list[dict]:
    """For each example of a span split: {"answer", "start", "end" (characters of its
    context), "score" (the answer's probability within its window: p(start) p(end))} from the
    windows' [F, T] start / end logits; an example whose windows allow no answer gets "" at
    0, 0 with score 0."""
    best: list[tuple[float, float, int, int]] = [(-np.inf, 0.0, 0, 0)] * len(split.rows)
    siblings = collections.defaultdict(list)  # example -> its windows
    for f, w in enumerate(split.windows):
        siblings[w.example].append(f)
    for f, w in enumerate(split.windows):
        lo, hi = w.prefix, w.prefix + w.size  # the window's context tokens
        # over all the window's tokens, as in training: a window trained to point at its
        # first token (no answer inside) gives its context little probability
        s_logp, e_logp = (_log_softmax(x[f])[lo:hi] for x in (start, end))
        top_s = np.argsort(-s_logp)[:N_BEST]
        top_e = np.argsort(-e_logp)[:N_BEST]
        for i in top_s:
            if not _max_context(split.windows, siblings[w.example], f, w.start + int(i)):
                continue
            for j in top_e:
                if j < i or j - i + 1 > max_answer_len:
                    continue
                score = float(s_logp[i] + e_logp[j])
                if score > best[w.example][0]:
                    best[w.example] = (score, float(np.exp(score)), w.start + int(i),
                                       w.start + int(j))
    out = []
    for e, (score, prob, i, j) in enumerate(best):
        if score == -np.inf:
            out.append({"answer": "", "start": 0, "end": 0, "score": 0.0})
            continue
        a, b = split.spans[e][i][0], split.spans[e][j][1]
        out.append({"answer": split.rows[e]["context"][a:b], "start": a, "end": b,
                    "score": prob})
    return out


def _max_context(windows: list[Window], siblings: list[int], f: int, token: int) -> bool:
    """Whether window f gives context token `token` the most context of all its example's
    windows that hold it (Google's: min(left, right) + 0.01 size, first window on ties): an
    answer starting at a window's cut edge is taken from the window that sees around it."""
    def context(w: Window) -> float:
        return min(token - w.start, w.start + w.size - 1 - token) + 0.01 * w.size
    best = max((g for g in siblings
                if windows[g].start <= token < windows[g].start + windows[g].size),
               key=lambda g: (context(windows[g]), -g))
    return best == f


def span_metrics(split: Split, start: np.ndarray, end: np.ndarray, max_answer_len: int
                 ) -> dict[str, float]:
    """eval_loss (per window) and SQuAD's eval_exact and eval_f1 (percent) of a span split."""
    f = split.features
    rows = np.arange(len(start))
    loss = -(_log_softmax(start)[rows, f["start_positions"]] +
             _log_softmax(end)[rows, f["end_positions"]]).mean() / 2
    exact, f1 = [], []
    for row, answer in zip(split.rows, best_answers(split, start, end, max_answer_len)):
        golds = row.get("answers", {}).get("text") or [""]
        exact.append(max(float(normalize_answer(answer["answer"]) == normalize_answer(g))
                         for g in golds))
        f1.append(max(answer_f1(answer["answer"], g) for g in golds))
    return {"eval_loss": float(loss), "eval_exact": 100 * float(np.mean(exact)),
            "eval_f1": 100 * float(np.mean(f1))}


def evaluate(run: RunConfig, eval_step, params, loader: LabelledLoader, split: Split
             ) -> dict[str, float]:
    """The eval record of the whole eval split (`eval_step(params, batch)` -> head outputs)."""
    outs = [jax.device_get(eval_step(params, loader.batch_at(loader_state(i * loader.batch_size))))
            for i in range(loader.num_sequences // loader.batch_size)]
    cat = {k: np.concatenate([o[k] for o in outs])[:loader.real] for k in outs[0]}
    if "logits" in cat:
        return classify_metrics(cat["logits"], split.features["labels"])
    return span_metrics(split, cat["start"], cat["end"], run.task.max_answer_len)


def loader_state(position: int):
    from lm.data.loader import LoaderState
    return LoaderState(0, position)


# ---------------------------------------------------------------------------------------------
# Serving the heads: lm.predict, lm.serve


def encoder_function(run: RunConfig):
    """(params, tokens [B, T], token types [B, T], lengths [B]) -> {"pooled" [B, D], and
    "probs" [B, C] (classify) or "start" / "end" logits [B, T] (span)}, float32: what lm.predict,
    lm.serve and lm.export run of an encoder or fine-tuned checkpoint."""
    from lm.model import abstract_model
    graphdef, _ = abstract_model(run.model, run.precision, run.task)
    name = run.task.name

    def forward(params, tokens, types, lengths):
        model = nnx.merge(graphdef, params)
        x_btd = model.hidden(tokens, token_types=types, lengths=lengths)
        out = {"pooled": model.pooled(x_btd, lengths).astype(jnp.float32)}
        if name == "classify":
            out["probs"] = jax.nn.softmax(model.class_logits(x_btd, lengths), -1)
        if name == "span":
            logits = model.span_logits(x_btd)
            out["start"], out["end"] = logits[..., 0], logits[..., 1]
        return out
    return forward


class Encoder:
    """A classify / span / masked-LM checkpoint's forward passes over rows of any length: rows
    are bucketed by length (powers of two, lm.predict's buckets) and run --batch-size at a time
    in one jit (a compile per shape). `classify`, `answer` and `embed` (the pooled vector of
    `Transformer.pooled`) take and return Python values."""

    def __init__(self, run: RunConfig, params, tokenizer, batch_size: int = 32):
        if tokenizer is None:
            raise ConfigError("this checkpoint has no tokenizer (WORKDIR/data.json): an encoder "
                              "needs one to read text")
        self.run, self.params, self.tokenizer, self.batch_size = run, params, tokenizer, \
            batch_size
        self.task, self.cfg = run.task, run.model
        self.seq_len = run.train.seq_len  # the windows it was trained on (cut longer inputs)
        self.labels = run.task.label_list
        self._forward = jax.jit(encoder_function(run))
        self.shapes: set[tuple[int, int]] = set()

    @classmethod
    def from_checkpoint(cls, path: str, batch_size: int = 32) -> "Encoder":
        from lm.predict import load_checkpoint
        run, params, tok = load_checkpoint(path)
        return cls(run, params, tok, batch_size)

    def forward(self, encoded: list[tuple[list[int], list[int]]]) -> dict[str, np.ndarray]:
        """The outputs of (ids, types) rows, in order (each row's own, whatever its batch)."""
        from lm.predict import bucket
        out: dict[str, list] = {}
        order = sorted(range(len(encoded)), key=lambda j: len(encoded[j][0]))
        results: list[dict | None] = [None] * len(encoded)
        for lo in range(0, len(order), self.batch_size):
            chunk = order[lo:lo + self.batch_size]
            t = bucket(max(len(encoded[j][0]) for j in chunk), self.cfg.max_len)
            feats = _pad([encoded[j][0] for j in chunk] + [[self.tokenizer.pad_id]] *
                         (self.batch_size - len(chunk)),
                         [encoded[j][1] for j in chunk] + [[0]] * (self.batch_size - len(chunk)),
                         t, self.tokenizer.pad_id)
            self.shapes.add((self.batch_size, t))
            got = jax.device_get(self._forward(self.params, feats["tokens"],
                                               feats["token_types"], feats["lengths"]))
            for r, j in enumerate(chunk):
                results[j] = {k: v[r] for k, v in got.items()}
        for k in (results[0] or {}):
            out[k] = [r[k] for r in results]
        return out

    def _check_length(self, text: str, name: str) -> None:
        if not isinstance(text, str):
            raise ValueError(f"{name!r} must be a string")

    def embed(self, texts: list[str]) -> np.ndarray:
        """[N, D] pooled vectors of texts (cut to model.max_len tokens)."""
        for t in texts:
            self._check_length(t, "input")
        got = self.forward([encode_classify(self.tokenizer, t, None, self.seq_len)
                            for t in texts])
        return np.stack(got["pooled"]) if texts else np.zeros((0, self.cfg.d_model))

    def classify(self, rows: list[dict]) -> list[dict]:
        """{"label", "probs": {label: probability}} of {"text", "text_pair"?} rows."""
        if self.task.name != "classify":
            raise ConfigError(f"this checkpoint is task.name {self.task.name!r}, not a "
                              "classifier")
        for r in rows:
            check_classify(r)
        got = self.forward([encode_classify(self.tokenizer, r["text"], r.get("text_pair"),
                                            self.seq_len) for r in rows])
        return [{"label": self.labels[int(np.argmax(p))],
                 "probs": {str(label): float(q) for label, q in zip(self.labels, p)}}
                for p in got.get("probs", [])]

    def answer(self, rows: list[dict]) -> list[dict]:
        """{"answer", "start", "end", "score"} of {"question", "context"} rows."""
        if self.task.name != "span":
            raise ConfigError(f"this checkpoint is task.name {self.task.name!r}, not a span "
                              "(question-answering) model")
        for r in rows:
            check_span({**r, "answers": None})
        rows = [dict(r, answers=None) for r in rows]
        split = span_split("request", list(enumerate(rows)), self.tokenizer, self.task,
                           self.seq_len)
        got = self.forward([(w.ids, w.types) for w in split.windows])
        t = max(len(w.ids) for w in split.windows)
        start = np.full((len(split.windows), t), -1e9, np.float32)
        end = start.copy()
        for f, (s, e) in enumerate(zip(got["start"], got["end"])):
            n = len(split.windows[f].ids)
            start[f, :n], end[f, :n] = s[:n], e[:n]
        return best_answers(split, start, end, self.task.max_answer_len)
