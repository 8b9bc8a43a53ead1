"""RSTPM without attention gates (paper Table 5)."""

from configs import mvtec
from rstpm_jax import ablations


def get_config():
    config = mvtec.get_config()
    ablations.rstpm_no_attention(config)
    return config
