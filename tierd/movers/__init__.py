"""Movers: carry out the policy's batches, by physical address or per process.

Every mover follows the Mover protocol (mover.py) and is opened through the
registry (registry.py) by its `movers.kind` name. Both honour move_pages(2)'s
per-page status contract (tierd.movers.batches) and the safety rules
(tierd.movers.safety); the PID mover resolves PFNs through the reverse map
(tierd.movers.rmap).
"""
