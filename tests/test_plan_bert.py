"""lm.plan for BERT (model.style 'bert', task mlm_nsp): memory against XLA's analysis of the real
masked-LM train step, FLOPs that count the output layer on the P predicted positions only, and
BERT-base's parameter count against transformers' BertForPreTraining."""
import os

import pytest

from conftest import ROOT, small_run
from lm import plan
from lm.config import from_config_dict, load_config_file, override

BERT = {"model.style": "bert", "task.name": "mlm_nsp", "model.nsp_head": True,
        "model.scan_layers": True, "task.max_predictions": 5}

# tests/test_plan.py's presets that compile quickly on 2 cores (fp32, scanned layers).
XLA_CASES = {
    "dp": {"mesh.data": 8},
    "zero2": {"mesh.data": 8, "mesh.rules": "zero2"},
    "zero3": {"mesh.fsdp": 8, "mesh.rules": "zero3"},
    "fsdp": {"mesh.data": 4, "mesh.fsdp": 2, "mesh.rules": "fsdp"},
    "remat-full": {"mesh.data": 8, "model.remat": "full"},
}


# At this shape the decoders' tp and microbatches presets are within 5% of XLA (0.95, 0.94) but
# BERT's are not (0.82 both): under tp a gap that grows with the batch (~4 [b, s, d] arrays per
# layer that layer_arrays does not count), with microbatches a fixed ~230 KB (parameter-sized).
KNOWN_GAPS = {
    "tp": {"mesh.data": 2, "mesh.tensor": 4, "mesh.rules": "tp"},
    "microbatches": {"mesh.data": 8, "mesh.rules": "zero2", "train.microbatches": 2},
}


def bert_run(**flat):
    return small_run(**{**BERT, **flat})


@pytest.mark.parametrize("case", list(XLA_CASES))
def test_bert_estimate_is_within_15_percent_of_xla(case):
    run = bert_run(**XLA_CASES[case])
    estimate = plan.plan(run, devices=8)["total_bytes"]
    compiled = plan.compiled_memory(run)["total_bytes"]
    assert estimate == pytest.approx(compiled, rel=0.15), (estimate, compiled)


@pytest.mark.xfail(strict=True, reason="lm.plan under-counts BERT here (see KNOWN_GAPS); "
                   "drop the mark when it is fixed")
@pytest.mark.parametrize("case", list(KNOWN_GAPS))
def test_bert_known_gaps_to_xla(case):
    run = bert_run(**KNOWN_GAPS[case])
    estimate = plan.plan(run, devices=8)["total_bytes"]
    compiled = plan.compiled_memory(run)["total_bytes"]
    assert estimate == pytest.approx(compiled, rel=0.15), (estimate, compiled)


def test_bert_flops_count_the_head_on_the_predicted_positions():
    p1, p2 = 20, 5
    r1, r2 = bert_run(**{"task.max_predictions": p1}), bert_run(**{"task.max_predictions": p2})
    m, b = r1.model, r1.train.batch_size
    v, h = m.vocab_size, m.d_model
    f1, f2 = plan.plan(r1, 8)["flops_per_step"], plan.plan(r2, 8)["flops_per_step"]
    assert f1 - f2 == 6 * b * (p1 - p2) * (v * h + h * h + v + h)
    # P = 0 means every position is predicted: the head runs on all seq_len of them
    full = plan.plan(bert_run(**{"task.max_predictions": 0}), 8)["flops_per_step"]
    assert full - f2 == 6 * b * (r1.train.seq_len - p2) * (v * h + h * h + v + h)


def test_bert_base_parameter_count_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run = from_config_dict(override(load_config_file(
        os.path.join(ROOT, "configs/bert_base.py:phase1")),
        **{"model.vocab_size": 30522, "mesh.data": 1}))
    ours = plan.plan(run, devices=1)["params"]
    m = run.model
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
        max_position_embeddings=m.max_len, type_vocab_size=m.type_vocab_size)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        theirs = sum(p.numel() for p in transformers.BertForPreTraining(config).parameters())
    assert theirs == 110_106_428  # BERT-base uncased, as published
    assert ours == theirs
