"""Custom ops: a convolution with a fast CPU weight gradient (``conv.platform_conv``)."""

from rstpm_jax.ops.conv import conv_general_dilated, platform_conv

__all__ = ["conv_general_dilated", "platform_conv"]
