"""RSTPM with ResNet18 as both teachers (paper Table 4)."""

from configs import mvtec


def get_config():
  config = mvtec.get_config()
  config.name = "rstpm_r18_r18"
  config.model.teacher2 = "resnet18"
  config.model.teacher2_weights = config.model.teacher1_weights
  return config
