import os
import sys

# Run from the repository (`python -m pytest hidden_tests`): the paper modules and the visible tests' helpers.
# The grader (tools/grade.py) copies the test files into its scratch copy's tests/ instead, without this file.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402

torch.set_num_threads(1)
