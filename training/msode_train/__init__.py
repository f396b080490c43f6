"""msode_train: synthetic data, per-scale networks, losses, training and evaluation for msode.

Training-side code only; the runtime SDK (``msode_sdk``) never imports it, nor does the export package
(``msode_export``). Importing this package registers its network architectures with
``msode_export.checkpoint`` (:func:`msode_train.models.register_architectures`), so checkpoints it writes
can be exported; ``msode export`` finds them through the ``msode.architectures`` entry point without
importing this package by name. See ``msode_train.data`` for the multi-contrast subject synthesis,
motion simulators and evaluation metrics.
"""

from . import models as _models  # noqa: F401  (registers the architectures on import)
