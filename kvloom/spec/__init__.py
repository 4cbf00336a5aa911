"""Speculative decoding: proposers (kvloom/spec/proposers.py) and verification (kvloom/spec/verify.py)."""
