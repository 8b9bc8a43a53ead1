"""Custom ops for speed on CPU, numerically checked against JAX's own: a convolution with a
fast weight gradient (``conv``), a max pool with an elementwise gradient (``pool``), batch
norm with a closed-form gradient (``batch_norm``), the flax layers built on them that the
models take on CPU (``layers``), and the XLA compiler options of the library's jitted
functions (``compile_options``)."""
