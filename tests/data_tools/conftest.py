import os
import sys

# dt_fixtures.py sits beside the tests; no __init__.py here, so make it importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
