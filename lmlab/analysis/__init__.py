"""Runs read back from their folders: summaries and comparisons, scaling-law fits, plots."""
