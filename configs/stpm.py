"""Original STPM: ResNet18 teacher and student 1 only, no attention."""

from configs import mvtec
from rstpm_jax import ablations


def get_config():
    config = mvtec.get_config()
    ablations.stpm(config)
    return config
