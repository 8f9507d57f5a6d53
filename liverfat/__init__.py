"""liverfat: liver attenuation and steatosis grade on unenhanced chest CT, as a DICOM node."""

import logging

__version__ = "0.1.0"
__all__ = ["__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
