"""Plain-Python scheduling core: no torch, unit-tested on plain data."""
