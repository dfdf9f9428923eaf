"""Corpora, vocabularies and batching: everything between text files and id tensors."""

from reglm.data.batching import batchify, get_batch
from reglm.data.corpus import SPLITS, Corpus, cache_dir, corpus_stats, encode_file, iter_lines, load_directory, read_tokens
from reglm.data.datasets import SOURCES, Source, download, resolve
from reglm.data.synthetic import TrigramLanguage, synthetic_corpus, synthetic_stats
from reglm.data.vocab import EOS, UNK, UnknownWordError, Vocab

__all__ = [
    "EOS",
    "SOURCES",
    "SPLITS",
    "UNK",
    "Corpus",
    "Source",
    "TrigramLanguage",
    "UnknownWordError",
    "Vocab",
    "batchify",
    "cache_dir",
    "corpus_stats",
    "download",
    "encode_file",
    "get_batch",
    "iter_lines",
    "load_directory",
    "read_tokens",
    "resolve",
    "synthetic_corpus",
    "synthetic_stats",
]
