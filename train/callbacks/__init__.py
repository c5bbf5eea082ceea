"""Trainer callbacks: everything around the loop that is not the loop (logging, images)."""
