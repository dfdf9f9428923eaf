"""Corpora, vocabularies and batching: everything between text files and id tensors."""

from reglm.data.bpe import BPEVocab, is_subword
from reglm.data.cache import load_cached
from reglm.data.corpus import (
    SPLITS,
    CacheInfo,
    Corpus,
    cache_dir,
    corpus_stats,
    encode_file,
    encode_subword_file,
    iter_lines,
    load_directory,
    read_tokens,
)
from reglm.data.datasets import SOURCES, Source, download, load_corpus, resolve, training_part
from reglm.data.synthetic import TrigramLanguage, synthetic_corpus, synthetic_stats
from reglm.data.vocab import EOS, UNK, UnknownWordError, Vocab
from reglm.data.windows import ContextPlan, StreamPlan, Window

__all__ = [
    "EOS",
    "SOURCES",
    "SPLITS",
    "UNK",
    "BPEVocab",
    "CacheInfo",
    "ContextPlan",
    "Corpus",
    "Source",
    "StreamPlan",
    "TrigramLanguage",
    "UnknownWordError",
    "Vocab",
    "Window",
    "cache_dir",
    "corpus_stats",
    "download",
    "encode_file",
    "encode_subword_file",
    "is_subword",
    "iter_lines",
    "load_cached",
    "load_directory",
    "read_tokens",
    "load_corpus",
    "resolve",
    "training_part",
    "synthetic_corpus",
    "synthetic_stats",
]
