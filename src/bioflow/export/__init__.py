"""Export of trained models into exchange formats (the BioImage Model Zoo's, see :mod:`.bioimageio`)."""
