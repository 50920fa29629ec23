"""Run ``klstudy`` and SIGKILL it at a precise moment: right after Tune has saved (and synced
to the study directory) an experiment state that registers a trial's checkpoint beyond its
first evaluation — the state a resume starts from.

    python tests/study/_killhook.py MARK_FILE klstudy-args...

Before dying the driver writes ``MARK_FILE``: ``{"trial_id", "step"}`` of that checkpoint.
Every evaluation row of that trial up to ``step`` must then be on disk (issue 17, item 1): the
resumed trial goes on past it and never reports those steps again.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def _install(mark: Path) -> None:
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
    from ray.tune.experiment.trial import Trial

    registered: list[dict] = []

    on_checkpoint = Trial.on_checkpoint

    def on_checkpoint_hooked(self, checkpoint_result):  # Tune registers a reported checkpoint
        on_checkpoint(self, checkpoint_result)
        metrics = checkpoint_result.metrics or {}
        every = int(self.config["trial"]["eval_every_steps"])
        if int(metrics.get("step", 0)) > every:  # not the first evaluation's checkpoint
            registered.append({"trial_id": metrics.get("klstudy_trial_id"),
                               "step": int(metrics["step"])})

    sync_up = _ExperimentCheckpointManager.sync_up_experiment_state

    def sync_up_hooked(self, save_fn, force=False, wait=False):
        saved_before = self._last_save_time
        sync_up(self, save_fn, force=force, wait=wait)
        if registered and self._last_save_time != saved_before:  # this call saved the state
            self._storage.syncer.wait()  # ... and it is in the study directory now
            mark.write_text(json.dumps(registered[0]))
            os.kill(os.getpid(), signal.SIGKILL)

    Trial.on_checkpoint = on_checkpoint_hooked
    _ExperimentCheckpointManager.sync_up_experiment_state = sync_up_hooked


if __name__ == "__main__":
    _install(Path(sys.argv[1]))
    from study.cli import main

    sys.exit(main(sys.argv[2:]))
