"""Maths on features: the training engine, its classifier sides, one fit, the fitted state, and labels."""
