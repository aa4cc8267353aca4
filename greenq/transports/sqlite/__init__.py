"""The sqlite transport."""
