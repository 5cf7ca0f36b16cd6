"""Synthetic task generators of the experiments (numpy, seeded, no model code)."""
