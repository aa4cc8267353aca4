"""``python -m greenq.worker`` = ``greenq-worker`` (the supervisor starts children this way)."""
import sys

from greenq.worker.launch import main

sys.exit(main())
