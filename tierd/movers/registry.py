"""Every mover, by its `movers.kind` name, in the order `kind: auto` tries them.

Adding a mover: write its module (a class following tierd.movers.mover.Mover
and an `open_mover(config, setup)` that raises tierd.errors.Unusable when the
host cannot run it), allow its name in the schema's movers.kind, add one line here.
"""

from __future__ import annotations

from tierd.movers import phys, pid
from tierd.movers.mover import MoverOpener

MOVERS: dict[str, MoverOpener] = {
    "phys": phys.open_mover,
    "pid": pid.open_mover,
}
