"""RSTPM without attention gates (paper Table 5)."""

from configs import mvtec


def get_config():
  config = mvtec.get_config()
  config.name = "rstpm_no_attention"
  config.model.attention = False
  return config
