"""Everything that reads or writes params: the bottom layer under train, tuning, evals,
export and serving. Imports only models/, config and the tokenizer.

  loaded = mmjax.io.load(path)   # an mmjax workdir or a Hugging Face directory
"""
from mmjax.io import storage
from mmjax.io.checkpointer import Checkpointer, UnreadableCheckpoint
from mmjax.io.hf import Pretrained, from_pretrained, save_pretrained
from mmjax.io.hf_config import SUPPORTED, UnsupportedModel
from mmjax.io.hf_params import KeyMismatch
from mmjax.io.loading import Loaded, base_params, kind_of, load
from mmjax.io.preprocess import ImagePreprocess
from mmjax.io.storage import RemoteUnreachable
from mmjax.io.trees import CheckpointMismatch

__all__ = ["Checkpointer", "CheckpointMismatch", "ImagePreprocess", "KeyMismatch", "Loaded",
           "Pretrained", "RemoteUnreachable", "SUPPORTED", "UnreadableCheckpoint",
           "UnsupportedModel", "base_params", "from_pretrained", "kind_of", "load",
           "save_pretrained", "storage"]
