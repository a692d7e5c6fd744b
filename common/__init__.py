"""Shared library of the attribution bundle collection.

Every bundle under ``bundles/`` imports its networks, losses, engines, metrics, attribution
baselines and data handling from here, so one concept lives in one place.
"""

__version__ = "0.1.0"
