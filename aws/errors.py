"""The errors of the aws package: one root, AwsError."""

from __future__ import annotations


class AwsError(Exception):
    """Root of the errors raised by this package."""
