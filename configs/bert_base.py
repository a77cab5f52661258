"""BERT-base (12 layers, 768 wide, 12 heads) in NVIDIA's two LAMB phases: see bert_large.py.

    python -m lm.train --config configs/bert_base.py:phase1 --workdir W --config.data.path=D
    python -m lm.train --config configs/bert_base.py:phase2 --workdir W --config.data.path=D
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "bert_large", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bert_large.py"))
_large = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_large)


def get_config(arg=None):
    return _large.bert("base", arg)
