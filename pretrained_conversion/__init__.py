"""torchvision -> Flax weight conversion (needs the ``convert`` extra only when converting).

See ``pretrained_conversion.convert_torchvision``; converted files load with
``rstpm_jax.models.pretrained.load_pretrained`` without torch.
"""
