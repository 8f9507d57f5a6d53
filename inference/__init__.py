"""Masks and numbers: segmentation backends, ROI placement, attenuation, grading, the pipeline.

No DICOM network and no pydicom datasets in this package's API. torch loads only when a
backend is created.
"""

import logging

__all__: list[str] = []

logging.getLogger(__name__).addHandler(logging.NullHandler())
