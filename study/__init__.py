"""klstudy's driver side: spec, Ray Tune driver, Optuna-pruning scheduler, results, CLI."""

from __future__ import annotations

__all__: list[str] = []
