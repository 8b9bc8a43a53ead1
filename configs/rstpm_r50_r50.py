"""RSTPM with ResNet50 as both teachers; student 1 is then a ResNet50 (paper Table 4)."""

from configs import mvtec
from rstpm_jax import ablations


def get_config():
    config = mvtec.get_config()
    ablations.rstpm_r50_r50(config)
    return config
