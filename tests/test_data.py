"""Tokenizer, embedded corpus and the deterministic loader."""
import numpy as np
import pytest

from lm import sharding
from lm.config import MeshConfig
from lm.data import ByteTokenizer, Loader, load_corpus


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo, 世界' # ✓\n"
    ids = tok.encode(text)
    assert ids.max() < 256 and tok.decode(ids) == text
    assert tok.decode(np.append(ids, tok.eod_id)) == text  # specials are not text
    assert tok.decode(tok.encode(b"\xff\xfeok")) == "\ufffd\ufffdok"  # invalid UTF-8 survives


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(eval_percent=2.0)


def test_stdlib_corpus_is_real_and_split(corpus):
    assert len(corpus.train) > 5_000_000 and corpus.num_documents > 500
    assert 0.005 < len(corpus.eval) / len(corpus.train) < 0.06
    assert corpus.train.max() <= corpus.tokenizer.eod_id
    # Held-out documents are whole files: a 200-byte window of eval text is not in train.
    window = corpus.eval[1000:1200].tobytes()
    assert window not in corpus.train.tobytes()


def test_loader_is_a_pure_function_of_step(corpus):
    a = Loader(corpus.train, 8, 32, seed=0)
    b = Loader(corpus.train, 8, 32, seed=0)
    np.testing.assert_array_equal(a.global_batch(5), b.global_batch(5))
    assert not np.array_equal(a.global_batch(5), a.global_batch(6))
    assert not np.array_equal(a.global_batch(5), Loader(corpus.train, 8, 32, seed=1).global_batch(5))
    assert a.global_batch(0).shape == (8, 33)


def test_sharded_batch_matches_host_batch(corpus):
    mesh = sharding.make_mesh(MeshConfig(data=4, fsdp=2))
    loader = Loader(corpus.train, 16, 32, seed=0, sharding=sharding.batch_sharding(mesh))
    batch = loader.batch(3)
    assert batch.shape == (16, 33) and len(batch.addressable_shards) == 8
    assert batch.addressable_shards[0].data.shape == (2, 33)
    np.testing.assert_array_equal(np.asarray(batch), loader.global_batch(3))
