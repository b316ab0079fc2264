"""Collectors: each turns one kernel source into access evidence (see evidence.py).

Every collector follows the Collector protocol (collector.py) and is opened
through the registry (registry.py) by its config section's name.
"""
