"""Every key at its default (the schema in lm/config.py). Other files in configs/ start from
`lm.config.defaults()` too and override keys.

    python -m lm.train --config configs/base.py --workdir /tmp/base
"""
from lm.config import defaults


def get_config(arg=None):
    del arg
    return defaults()
