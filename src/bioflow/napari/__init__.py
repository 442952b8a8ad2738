"""bioflow in napari: a predict widget, a train widget and sample data (an npe2 plugin).

Installed with ``pip install 'bioflow[napari]'``; napari finds it through the ``napari.manifest``
entry point (``napari.yaml`` here). Nothing here is imported by bioflow itself, so the core
install stays free of Qt. The modules ``models``, ``layers`` and ``jobs`` hold the widgets' work
without Qt; ``predict_widget``, ``train_widget`` and ``common`` are the Qt side. See docs/napari.md.
"""
