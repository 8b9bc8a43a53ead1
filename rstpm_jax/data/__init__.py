"""Data: MVTec AD layout scan (``mvtec``), TFDS builder (``tfds_mvtec``), tf.data pipeline
(``input_pipeline``) and the synthetic demo dataset (``synthetic``).

``mvtec`` and ``synthetic`` import no TensorFlow; ``input_pipeline`` imports it lazily.
"""
