"""The redis transport."""
