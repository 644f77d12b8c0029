"""Data: sources (shapes, digits, files, folder, tfds), tokenizer, and the grain batch iterator."""

from mmjax.data.errors import DataError
from mmjax.data.pipeline import make_dataset, make_iterator
from mmjax.data.sources import SOURCES, Sources, build_source
from mmjax.data.tokenizer import Tokenizer, get_tokenizer, load_tokenizer

__all__ = ['DataError', 'SOURCES', 'Sources', 'Tokenizer', 'build_source', 'get_tokenizer',
           'load_tokenizer', 'make_dataset', 'make_iterator']
