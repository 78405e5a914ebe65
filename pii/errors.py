"""The errors of the pii package: one root, MaskingError (pii.masking's name for it too)."""

from __future__ import annotations


class MaskingError(Exception):
    """Root of the errors raised by this package."""
