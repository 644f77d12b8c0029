"""Hugging Face checkpoints (safetensors) <-> mmjax models, with strict key checks.

  p = mmjax.from_pretrained("path/to/hf_dir")      # model, params, tokenizer, preprocess
  save_pretrained("out_dir", p.config, p.params)    # config.json + model.safetensors
"""
from mmjax.convert.hf_config import SUPPORTED, UnsupportedModel
from mmjax.convert.hf_params import KeyMismatch
from mmjax.convert.preprocess import ImagePreprocess
from mmjax.convert.pretrained import Pretrained, from_pretrained, save_pretrained

__all__ = ["SUPPORTED", "UnsupportedModel", "KeyMismatch", "ImagePreprocess", "Pretrained",
           "from_pretrained", "save_pretrained"]
