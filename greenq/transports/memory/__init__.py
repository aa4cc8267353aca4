"""The memory transport."""
