from mmjax.train.loop import train
from mmjax.train.state import TrainState
