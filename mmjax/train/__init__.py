from mmjax.train.loop import finetune, train
from mmjax.train.state import TrainState
