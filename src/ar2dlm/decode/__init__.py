"""Decoding: prefill -> step (verify + pre-draft in one forward) -> commit."""
