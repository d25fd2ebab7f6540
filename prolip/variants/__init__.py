"""Estimators and tools around a ProLIPAdapter: the search, RLA, + Tip-Adapter, test-time ProLIP, many tasks, torchrun."""
