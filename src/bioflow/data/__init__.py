"""Data: sources of images and targets, splits, normalisation, patches, augmentation, loaders."""
