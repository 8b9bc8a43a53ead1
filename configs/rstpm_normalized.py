"""RSTPM with the normalised fusion (beyond the paper): each of the six maps divided into
``(m - q_low) / (q_high - q_low)`` by its own quantiles over the held-out normal images, students
added per resolution, the resolutions multiplied (``normalized_sum``: all added instead).

    --config.maps.fusion=normalized_sum --config.maps.kwargs.q_low=0.9 --config.maps.kwargs.q_high=0.995
"""

from configs import mvtec


def normalized(config, fusion: str = "normalized_multiply"):
    """``config`` with a normalised fusion rule and its quantile keys (so that the command line
    can override them)."""
    config.maps.fusion = fusion
    config.maps.kwargs.q_low = 0.9
    config.maps.kwargs.q_high = 0.995
    return config


def get_config():
    config = normalized(mvtec.get_config())
    config.name = "rstpm_normalized"
    return config
