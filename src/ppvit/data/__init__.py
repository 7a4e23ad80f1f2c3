"""Images in and out: sources of plain images, the encrypt/decrypt engine and its formats, datasets, batches.

``ppvit.data`` was a module until 0.2; its names still resolve here (deprecated) from
:mod:`ppvit.data.datasets`, :mod:`~ppvit.data.pipeline` and :mod:`~ppvit.data.augment`.
"""

import sys

from ppvit._compat import forward

forward(sys.modules[__name__], ("ppvit.data.datasets", "ppvit.data.pipeline", "ppvit.data.augment"), "ppvit.data")
