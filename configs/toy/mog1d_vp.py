"""MOG1D toy data, VP SDE, MLP score network (the paper's synthetic experiment)."""
from configs.toy.common import get_toy_config


def get_config():
  return get_toy_config('MOG1D', dim=1, sde='vpsde')
