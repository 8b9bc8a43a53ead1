"""RSTPM with ResNet50 as both teachers; student 1 is then a ResNet50 (paper Table 4)."""

from configs import mvtec


def get_config():
  config = mvtec.get_config()
  config.name = "rstpm_r50_r50"
  config.model.teacher1 = "resnet50"
  config.model.teacher1_weights = config.model.teacher2_weights
  return config
