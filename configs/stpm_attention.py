"""STPM + attention gates (student 1 only)."""

from configs import mvtec
from rstpm_jax import ablations


def get_config():
    config = mvtec.get_config()
    ablations.stpm_attention(config)
    return config
