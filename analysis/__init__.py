"""klstudy's analysis side: reads study stores and writes reports; never imports ray."""

from __future__ import annotations

__all__: list[str] = []
