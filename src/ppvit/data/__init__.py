"""Images in and out: sources of images, the encrypt/decrypt engine and its formats, datasets, batches.

``ppvit.data`` was a module until 0.2; its names still resolve here (deprecated) from
:mod:`ppvit.data.datasets`, :mod:`~ppvit.data.pipeline`, :mod:`~ppvit.data.augment`, :mod:`~ppvit.data.cache`,
:mod:`~ppvit.data.sources.cifar10` and :mod:`~ppvit.data.legacy`.
"""

import sys

from ppvit._compat import forward

forward(
    sys.modules[__name__],
    (
        "ppvit.data.datasets",
        "ppvit.data.pipeline",
        "ppvit.data.augment",
        "ppvit.data.cache",
        "ppvit.data.sources.cifar10",
        "ppvit.data.legacy",
    ),
    "ppvit.data",
)
