"""Joining Ray: the cluster at `address` (or RAY_ADDRESS), else a Ray started here on loopback.

One place for it because two components start Ray on demand (the reward pool, rewards/ray_pool.py,
and the separate rollout worker, generation/rollout_worker.py): whichever comes first starts it,
the other joins it, and only the one that started it shuts it down.
"""

from __future__ import annotations

import os
import signal
import threading

NAMESPACE = "nemo_rlsr"
_LOCAL_OBJECT_STORE_BYTES = 128 * 2**20  # a local (single-machine) Ray: texts, results, tiny models are small


def connect_ray(address: str | None, num_cpus: int) -> bool:
    """Join Ray (a no-op when this process already has); True when this call started a local Ray,
    which the caller then owns and shuts down. `num_cpus` sizes a local Ray only."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    handlers = _python_handlers()
    if address is not None:
        ray.init(address=address, namespace=NAMESPACE, configure_logging=False)
    else:
        # Loopback only: a Ray started for one machine's ranks has no business on the network.
        # address="local": a new Ray, never one a `ray start` left running on this machine.
        ray.init(address="local", num_cpus=max(num_cpus, 1), include_dashboard=False, namespace=NAMESPACE,
                 object_store_memory=_LOCAL_OBJECT_STORE_BYTES, configure_logging=False,
                 _node_ip_address="127.0.0.1")
    _restore(handlers)
    return address is None


# Ray's driver installs a C-level failure handler for SIGTERM (it prints a stack and aborts: exit
# -6) over the Python handler Python had installed at the OS level: the trainer's preemption
# handler (trainer/preemption.py), installed before any component starts Ray, would never run.
_PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _python_handlers() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}  # Python sets handlers from the main thread only
    return {sig: signal.getsignal(sig) for sig in _PREEMPTION_SIGNALS}


def _restore(handlers: dict) -> None:
    for sig, handler in handlers.items():
        if handler is not None:  # None: set from C before Python started, nothing of ours to restore
            signal.signal(sig, handler)
