"""Flax Linen models: torchvision-layout ResNets, attention gates, students, RSTPM."""
