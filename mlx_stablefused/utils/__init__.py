"""Image and array utilities."""
