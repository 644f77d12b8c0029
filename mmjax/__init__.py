"""mmjax: multimodal models in JAX/Flax."""
from mmjax.config import load_config
from mmjax.io import from_pretrained, load, save_pretrained
from mmjax.models import build_model
from mmjax.train.loop import evaluate, finetune, restore, train

__all__ = ["load_config", "build_model", "train", "evaluate", "restore", "from_pretrained",
           "save_pretrained", "finetune", "load"]
__version__ = "0.1.0"
