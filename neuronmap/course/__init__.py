"""The course that the tutorials in `tutorials/` make: checkers for their exercises, and their solved copies.

A checker (`neuronmap.course.ch01`, ...: one module per chapter) takes a student's answer plus whatever it needs
to recompute the right one (the model, the inputs), recomputes it independently of the code path the tutorial
teaches (plain PyTorch hooks on the Hugging Face modules rather than NeuronMap hook points), prints a ✓ or ✗
line and returns True or False. A ✗ line hints without giving the answer away; `reveal=True` adds the answer.
No checker stores an expected answer.

The tutorials are student copies; `solve` (or `python -m neuronmap.course solve NOTEBOOK OUTPUT`) writes the
solved copy from the solution file beside them.
"""

from . import ch01, ch02, ch03, ch04, ch05, ch06
from .solutions import SolutionError, solve

__all__ = ["SolutionError", "ch01", "ch02", "ch03", "ch04", "ch05", "ch06", "solve"]
