"""``python -m albef_ds …`` is ``albef-ds …`` (handy under launchers: ``deepspeed --module albef_ds``)."""
import sys

from .cli import main

sys.exit(main())
