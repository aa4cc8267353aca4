"""Resource permits: concurrency limits per downstream (CONTRACT section 11)."""
