"""``python -m albef_ds …`` is ``albef-ds …`` (handy under launchers: ``deepspeed --module albef_ds``)."""
from .cli import program

program()
