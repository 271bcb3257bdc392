import os
import sys

# Tests import the flat top-level modules of the repository.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
