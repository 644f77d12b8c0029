"""mmjax: multimodal models in JAX/Flax."""
from mmjax.config import load_config
from mmjax.convert import from_pretrained, save_pretrained
from mmjax.tuning import finetune
from mmjax.models import build_model
from mmjax.train.loop import evaluate, restore, train

__all__ = ["load_config", "build_model", "train", "evaluate", "restore", "from_pretrained",
           "save_pretrained", "finetune"]
__version__ = "0.1.0"
