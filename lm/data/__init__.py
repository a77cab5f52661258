"""Data: tokenizers, the embedded corpus and the deterministic batch loader."""
from lm.data.corpus import Corpus, load_corpus, stdlib_documents
from lm.data.loader import Loader
from lm.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "Corpus", "Loader", "load_corpus", "stdlib_documents"]
