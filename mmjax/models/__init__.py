from mmjax.models.registry import SIZES, build_model, tower_size
from mmjax.models.model import MultimodalModel
