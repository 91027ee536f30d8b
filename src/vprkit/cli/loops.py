"""`vprkit loops` commands (being written)."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Add this topic's commands to ``group``."""
