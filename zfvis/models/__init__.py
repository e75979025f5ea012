"""Models: the zoo (architectures, weights, preprocessing, layer aliases) and weights files.

- :mod:`~zfvis.models.zoo`: :func:`load_model`, the registry of architectures;
- :mod:`~zfvis.models.checkpoints`: reading state dicts and checkpoints (``weights_only=True``);
- :mod:`~zfvis.models.snapshots`: the shipped training snapshots (``zfvis evolution`` offline);
- ``weights/``: the weights shipped in the package (``zfnet-cifar10``).
"""
