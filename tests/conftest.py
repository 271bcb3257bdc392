import os
import sys

# Tests import the flat top-level modules of the repository.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# The test models are tiny: one thread avoids thread hand-off costs that dominate such small matmuls,
# and keeps the suite fast on a busy 2-core machine.
torch.set_num_threads(1)
