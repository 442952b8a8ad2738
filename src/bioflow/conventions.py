"""Conventions that several layers share (data, losses, metrics, tasks).

``IGNORE_INDEX`` marks target pixels that count in no loss and no metric: the padding of patches
cut at an image border, and (in label masks) unannotated pixels.
"""

IGNORE_INDEX = -1
