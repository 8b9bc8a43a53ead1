"""STPM + attention gates (student 1 only)."""

from configs import mvtec


def get_config():
  config = mvtec.get_config()
  config.name = "stpm_attention"
  config.model.student2 = False
  return config
