"""``python -m greenq.cli`` = ``greenq``."""
import sys

from greenq.cli.admin import main

sys.exit(main())
