"""``python -m grcm`` is the ``grcm`` command."""

from grcm.cli import main

main()
