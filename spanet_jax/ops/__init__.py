"""Faster exact formulations, most with hand-written gradients, one concern per module.
Which one a model uses where it has a choice is decided in platform.py alone."""
