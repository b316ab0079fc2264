"""Collectors: each turns one kernel source into access evidence (see evidence.py)."""
