"""msode_train: synthetic data, per-scale networks, losses, training and evaluation for msode.

Training-side code only; the runtime SDK (``msode_sdk``) never imports it. See ``msode_train.data``
for the multi-contrast subject synthesis, motion simulators and evaluation metrics.
"""
