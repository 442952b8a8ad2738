"""bioflow and the BioImage Model Zoo's model format (bioimage.io, spec v0.5), both ways.

Reading: :mod:`.package` (what a package is, its description, weights' runtimes, tensor axes) and
:mod:`.runtime` (a package bioflow wrote rebuilt as its task; any other package predicted through
bioimage.io's own runtime with bioflow's tiling). Writing (``bioflow export``): :mod:`.export`,
with :mod:`.description` (rdf.yaml), :mod:`.readme`, :mod:`.images` (test tensors, samples,
cover), :mod:`.weights` and :mod:`.networks` (torch-only sources). Nothing here knows a task by
name: a task contributes through its exchange hooks (:mod:`bioflow.tasks.exchange`). Needs the
``bioimageio`` extra.
"""
