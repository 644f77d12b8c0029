"""mmjax: multimodal models in JAX/Flax."""
from mmjax.config import load_config
from mmjax.models import build_model
from mmjax.train.loop import evaluate, train

__all__ = ["load_config", "build_model", "train", "evaluate"]
__version__ = "0.1.0"
