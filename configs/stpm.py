"""Original STPM: ResNet18 teacher and student 1 only, no attention."""

from configs import mvtec


def get_config():
  config = mvtec.get_config()
  config.name = "stpm"
  config.model.student2 = False
  config.model.attention = False
  return config
