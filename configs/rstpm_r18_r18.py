"""RSTPM with ResNet18 as both teachers (paper Table 4)."""

from configs import mvtec
from rstpm_jax import ablations


def get_config():
    config = mvtec.get_config()
    ablations.rstpm_r18_r18(config)
    return config
