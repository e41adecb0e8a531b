"""Checkers for the tutorials in `tutorials/`: one module per chapter (`neuronmap.course.ch01`, ...).

A checker takes a student's answer plus whatever it needs to recompute the right one (the model, the
inputs), recomputes it independently of the code path the tutorial teaches (plain PyTorch hooks on the
Hugging Face modules rather than NeuronMap hook points), prints a ✓ or ✗ line saying what is right or
wrong, and returns True or False. No checker stores an expected answer.
"""

from . import ch01, ch02

__all__ = ["ch01", "ch02"]
