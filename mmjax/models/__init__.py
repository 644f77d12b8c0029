from mmjax.models.model import MultimodalModel, variables
from mmjax.models.registry import SIZES, build_model, tower_size
