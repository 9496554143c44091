"""neonb: neonatal brain MRI segmentation and label-efficient studies.

A thin layer over PyTorch and MONAI that reproduces and extends Richter & Fetit (2022),
"Accurate segmentation of neonatal brain MRI with deep learning", Front. Neuroinform.
16:1006532, on the dHCP third release or on a synthetic neonatal cohort that neonb
generates itself.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("neonb")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
