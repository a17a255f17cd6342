"""MaskSAM pipeline: prompt-free, mask-classification SAM for 3D medical image segmentation.

The package is laid out as DESIGN.md describes: ``masksam.model`` (the network, pure PyTorch),
``masksam.components`` (one module per pipeline step, with its CLI) and ``masksam.pipelines``
(the Kubeflow pipeline). Imports go one way: components use model; pipelines use components.
"""

__version__ = "0.1.0"
