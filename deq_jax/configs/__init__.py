"""Training configs (``ml_collections`` files) shipped with the library.

Pass one by path to the training command, e.g. ``deq-jax-train
--config=deq_jax/configs/cifar_tiny.py`` from a checkout (or the file's path inside the
installed package); ``digits.py`` is the default. Every key is listed, with its default, in
:func:`deq_jax.train.config.default_config`.
"""
