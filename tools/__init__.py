"""Repository tools run from the root as `python -m tools.<name>` (not installed with the package)."""
