"""The one exception type of the conversion code (a ValueError, so callers that catch those still do)."""


class ConversionError(ValueError):
    """A checkpoint that cannot be converted: wrong architecture, unreadable file, unknown layout."""
