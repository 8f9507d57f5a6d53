"""DICOM <-> arrays: reading series, eligibility, resampling, SEG/SR/key image writers.

No network and no models here. Import the modules directly (``liverfat.dicom_io.read``, ...).
"""

import logging

__all__: list[str] = []

logging.getLogger(__name__).addHandler(logging.NullHandler())
