"""Shared library of the attribution bundle collection.

Every bundle under ``bundles/`` imports its networks, losses, engines, metrics, attribution
baselines and data handling from here, so one concept lives in one place.
"""

from common.errors import install_input_error_report

__version__ = "0.1.0"

# Every bundle config imports ``common``: a bad input then ends ``python -m monai.bundle run`` with one
# line naming the file and the problem, not MONAI's nested "Failed to evaluate" tracebacks.
install_input_error_report()
