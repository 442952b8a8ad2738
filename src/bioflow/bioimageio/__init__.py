"""bioflow and the BioImage Model Zoo's model format (bioimage.io, spec v0.5), both ways.

:mod:`.export` writes a trained model as a package (``bioflow export``), :mod:`.networks` the
torch-only sources and weights it carries, :mod:`.runtime` runs packages, bioflow's or another
tool's, through bioimage.io's own runtime with bioflow's tiled prediction (``bioflow predict``).
Needs the ``bioimageio`` extra.
"""
