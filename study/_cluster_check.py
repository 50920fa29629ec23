"""Connecting to Ray; then, on a multi-node cluster, can every node read and write the study
directory before any trial runs there?

Tune keeps each trial's checkpoints, and klstudy its spools, under the study directory
(``storage_path``). A directory only the head can write (a local disk on the head, a path that
exists on the other nodes but is not the same filesystem) lets trials start there and then fail
at their first checkpoint — minutes or hours later. So the driver writes a nonce file into the
directory and runs one tiny task on every alive node (pinned with a node-affinity strategy,
0 CPUs, so it does not wait for trial slots): it must read the driver's file and write its own,
which the driver must then see. Any node that fails ends the study up front with a message that
names the node and says what to do.

Nodes that join later (an autoscaler) are not checked.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

from study._status import StudyError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 120.0  # a node that starts no worker process in time is reported, not refused
_PREFIX = ".klstudy-probe-"


def _init_ray(address: str | None) -> bool:
    """Connect to ``address`` (or RAY_ADDRESS), else start embedded Ray with node address
    127.0.0.1 and no dashboard; True if we started it. (Ray 2.60 still rewrites that address
    to the host's own interface address and binds its gRPC ports on every interface; there is
    no setting against it: FIELD-NOTES, README "Choices".)"""
    import ray

    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS")
    local = {} if target else {"_node_ip_address": "127.0.0.1", "include_dashboard": False}
    ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False, **local)
    return target is None


def connect(root: Path, address: str | None) -> bool:
    """Connect to Ray (True if we started it) and, on a multi-node cluster, check that every
    node shares the study directory ``root``; on a refusal Ray is left as it was found."""
    we_started_ray = _init_ray(address)
    try:
        check_shared_study_dir(root)
    except BaseException:
        if we_started_ray:
            import ray

            ray.shutdown()
        raise
    return we_started_ray


def _probe(root: str, nonce: str, node_id: str) -> dict[str, Any]:
    """Runs on one node: does it see the driver's file, and can it write its own?"""
    import ray

    out: dict[str, Any] = {"node_ip": ray.util.get_node_ip_address(), "sees": False,
                           "wrote": False, "error": ""}
    path = Path(root)
    try:
        out["sees"] = (path / f"{_PREFIX}{nonce}").read_text() == nonce
    except OSError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    if not out["sees"]:
        out["error"] = "the driver's probe file there has other contents"
        return out
    try:
        (path / f"{_PREFIX}{nonce}-{node_id}").write_text(node_id)
        out["wrote"] = True
    except OSError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def _alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_shared_study_dir(root: Path, *, timeout_s: float = PROBE_TIMEOUT_S) -> int:
    """Raise StudyError unless every alive node of the connected Ray cluster can read and write
    ``root``; returns the number of nodes checked (1: a single-node cluster, nothing to check)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = _alive_nodes()
    if len(nodes) < 2:
        return len(nodes)
    nonce = secrets.token_hex(8)
    mine = root / f"{_PREFIX}{nonce}"
    mine.write_text(nonce)
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    try:
        pending = {
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                node_id=n["NodeID"], soft=False)).remote(str(root), nonce, n["NodeID"]): n
            for n in nodes}
        ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
        problems = []
        for ref in ready:
            node = pending[ref]
            try:
                result = ray.get(ref)
            except Exception as exc:  # the node died, or the task could not run there
                log.warning("study-dir check: node %s did not answer: %s",
                            node.get("NodeManagerAddress"), exc)
                continue
            where = f"node {result['node_ip']} ({node['NodeID'][:8]})"
            if not result["sees"]:
                problems.append(f"{where} does not see the driver's file in it "
                                f"({result['error'] or 'missing'})")
            elif not result["wrote"]:
                problems.append(f"{where} cannot write to it ({result['error']})")
            elif not (root / f"{_PREFIX}{nonce}-{node['NodeID']}").exists():
                problems.append(f"{where} writes to it, but the driver does not see the file")
        for ref in late:
            ray.cancel(ref, force=True)
            log.warning("study-dir check: node %s did not answer within %.0f s; not checked",
                        pending[ref].get("NodeManagerAddress"), timeout_s)
    finally:
        for path in root.glob(f"{_PREFIX}{nonce}*"):
            path.unlink(missing_ok=True)
    if problems:
        raise StudyError(
            f"study dir {str(root)!r} is not shared by every node of the cluster: "
            + "; ".join(problems)
            + ". Trials keep their checkpoints there, so on a multi-node cluster it must be one "
              "filesystem that every node mounts at the same path (NFS, a shared volume); pass "
              "such a path as --study-dir")
    return len(nodes)


__all__ = ["check_shared_study_dir", "connect"]
