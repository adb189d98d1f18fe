"""``python -m albef_ds.cli ...`` is ``albef-ds ...``."""
import sys

from . import main

sys.exit(main())
