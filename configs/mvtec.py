"""Full RSTPM on MVTec AD with the paper's defaults (section 4.1).

The paper's setting is the library's default config: every key, with what it means, is in
``rstpm_jax/defaults.py``.
"""

import ml_collections

from rstpm_jax import defaults


def get_config() -> ml_collections.ConfigDict:
    return defaults.get_config()
