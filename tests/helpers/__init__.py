"""Harnesses the tests share: real processes, the scheduler simulator, task functions."""
