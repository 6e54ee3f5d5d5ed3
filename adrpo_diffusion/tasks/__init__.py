"""Synthetic tasks with pixel-checkable captions (the method lab's data and the ``shapes`` reward's grammar)."""
