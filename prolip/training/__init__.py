"""Maths on features: the training loop, one fit, the fitted state, labels, and the searches and test-time steps."""
