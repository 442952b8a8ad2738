"""Sample data for napari's File > Open Sample: the demo's generated images, so every widget can be
tried with nothing of one's own. Generated on the spot (nothing is downloaded), the same images
the demo experiments train on."""

from __future__ import annotations

from bioflow.napari.layers import LayerData


def nuclei_2d() -> list[LayerData]:
    """A 256×256 image of nuclei (touching and overlapping ones included) and its instance labels."""
    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image

    image, labels = synthetic_nuclei_image((256, 256), seed=0, index=0)
    return [(image, {"name": "nuclei"}, "image"), (labels, {"name": "nuclei labels"}, "labels")]


def nuclei_3d() -> list[LayerData]:
    """A 32×128×128 volume of nuclei (z step twice the pixel size) and its instance labels."""
    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image

    image, labels = synthetic_nuclei_image((32, 128, 128), seed=0, index=0, anisotropy=2.0)
    scale = (2.0, 1.0, 1.0)
    return [(image, {"name": "nuclei 3d", "scale": scale}, "image"),
            (labels, {"name": "nuclei 3d labels", "scale": scale}, "labels")]


def noisy() -> list[LayerData]:
    """A 256×256 image with Gaussian noise (sigma 25 of 255), for Noise2Void, and its clean version
    (for CARE as a target, and to judge a denoised result)."""
    from bioflow.data.synthetic_restoration import synthetic_restoration_pair

    degraded, clean = synthetic_restoration_pair((256, 256), seed=0, index=0, noise="gaussian", sigma=25.0)
    return [(degraded, {"name": "noisy"}, "image"), (clean, {"name": "clean", "visible": False}, "image")]
