"""An example bioflow plugin: one architecture, one loss and one post-processor, with configs."""

__version__ = "0.1.0"
