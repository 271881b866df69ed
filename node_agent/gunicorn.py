"""gunicorn config hooks that make every worker a hotfleet participant.

::

    HOTFLEET_ETCD=http://etcd:2379 HOTFLEET_CODE_PATH=/srv/app HOTFLEET_LABELS=zone=eu-west \\
    HOTFLEET_TRUST_KEY=/etc/hotfleet/release-signing.pub HOTFLEET_TLS_CERT=... \\
        gunicorn -c python:node_agent.gunicorn -w 4 -b 0.0.0.0:8080 shop.app:application

or, with a config file of your own, ``from node_agent.gunicorn import *`` in it
(calling :func:`post_worker_init` and the others from your own hooks if you
define the same ones).  Settings come from ``HOTFLEET_*`` environment
variables (:mod:`node_agent.embed`).

What the hooks do:

* **master** (``pre_fork``): gives each worker the lowest free *slot*
  (``0..workers-1``); a recycled worker (``max_requests``, a crash, a timeout)
  takes the slot its predecessor left, so its node id (``<host>-w<slot>``
  by default) is stable.  The master creates no agent, no gRPC server and no
  etcd client: nothing with threads exists before the fork.
* **worker** (``post_worker_init``, after the app is loaded and before the
  worker accepts a connection): builds the worker's own
  :class:`~node_agent.agent.Agent` (its own metrics, the host's labels plus
  ``host=<host>`` and ``worker=<slot>``, its own gRPC port: the base port
  plus the slot, or any free port, published in etcd), wraps the app
  (:meth:`Agent.wsgi`, or :meth:`Agent.asgi` under an ASGI worker class
  such as ``uvicorn.workers.UvicornWorker``) and starts the agent.  Start
  reconciles the worker to the fleet's permanent release and, inside a
  rollout's rollback window that names this node, to that provisional
  release: a worker recycled mid-window serves what its peers serve before
  its first request.
* **worker** (``worker_exit``): stops the agent, leaving its membership key
  to the lease: the successor in the same slot takes the key over, so a
  recycled worker does not read as a node gone down; a worker not replaced
  leaves the fleet when its lease expires (``HOTFLEET_LEASE_TTL``).

gunicorn's own graceful reload (``HUP``) starts new workers before the old
ones leave, so those take new slots; the old slots come back with the next
recycling.  ``coordctl nodes`` groups workers by their ``host`` label.
"""

from __future__ import annotations

import faulthandler
import itertools
import logging
import os
from typing import Any

__all__ = ["child_exit", "nworkers_changed", "post_worker_init", "pre_fork", "worker_exit"]

log = logging.getLogger("node_agent.gunicorn")

_SLOT_ATTR = "hotfleet_slot"
EXIT_DEADLINE_S = 15.0
_agent: Any = None  # this worker's Agent (only ever set in a worker process)


def worker_slot(worker: Any) -> int | None:
    """The slot the master gave ``worker`` (None if these hooks did not run in the master)."""
    slot = getattr(worker, _SLOT_ATTR, None)
    return slot if isinstance(slot, int) else None


# ------------------------------------------------------------------ master
def pre_fork(server: Any, worker: Any) -> None:
    """Master, before each fork: the lowest slot no live worker holds."""
    taken = {worker_slot(w) for w in server.WORKERS.values()}
    slot = next(n for n in itertools.count() if n not in taken)
    setattr(worker, _SLOT_ATTR, slot)


def child_exit(server: Any, worker: Any) -> None:
    """Master, a worker was reaped: its slot is free for the next fork."""
    log.info("hotfleet: worker slot %s (pid %s) exited", worker_slot(worker), worker.pid)


def nworkers_changed(server: Any, new_value: int, old_value: int | None) -> None:
    """Master, TTIN/TTOU: slots follow (new workers take the lowest free ones)."""
    if old_value is not None:
        log.info("hotfleet: %s -> %s workers", old_value, new_value)


# ------------------------------------------------------------------ worker
def _is_asgi(worker: Any) -> bool:
    forced = os.environ.get("HOTFLEET_INTERFACE", "").strip().lower()
    if forced in ("wsgi", "asgi"):
        return forced == "asgi"
    cls = type(worker)
    names = " ".join(f"{c.__module__}.{c.__name__}" for c in cls.__mro__).lower()
    return "uvicorn" in names or "asgi" in names


def _http_address(worker: Any, settings: Any) -> str:
    for sock in getattr(worker, "sockets", ()) or ():
        try:
            name = sock.getsockname()
        except OSError:
            continue
        if isinstance(name, tuple) and len(name) >= 2:
            host = str(name[0])
            if host in ("0.0.0.0", "::", ""):
                host = settings.advertise_host or settings.host
            return f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"
    return ""


def post_worker_init(worker: Any) -> None:
    """Worker, app loaded, no request yet: wrap the app and start this worker's agent."""
    global _agent
    from hotfleet import logsetup
    from node_agent.embed import Settings

    slot = worker_slot(worker)
    settings = Settings.from_env()
    if slot is None:  # the master ran without these hooks (e.g. they were set late)
        from node_agent.embed import claim_slot

        claim = claim_slot(settings.slot_dir, f"{settings.node_id_template}-{settings.host}")
        slot = claim.slot
        setattr(worker, _SLOT_ATTR, slot)
        worker._hotfleet_claim = claim  # kept open for the worker's life
    node_id = settings.node_id(slot)
    if os.environ.get("HOTFLEET_LOG_LEVEL") or os.environ.get("HOTFLEET_LOG_FORMAT"):
        logsetup.configure(
            os.environ.get("HOTFLEET_LOG_LEVEL", "INFO").upper(),
            os.environ.get("HOTFLEET_LOG_FORMAT", "text"),
            node=node_id,
        )
    agent = settings.agent(slot, _http_address(worker, settings))
    worker.wsgi = agent.asgi(worker.wsgi) if _is_asgi(worker) else agent.wsgi(worker.wsgi)
    worker.hotfleet_agent = agent
    _agent = agent
    worker.notify()  # the start below may take a while: gunicorn must not think us stuck
    agent.start()  # reconciles to the fleet's release before the first request
    log.info(
        "hotfleet: worker %s (pid %s) is node %s, gRPC %s, release %s",
        slot,
        os.getpid(),
        node_id,
        agent.address,
        agent.loader.current_release.label if agent.loader.current_release else "(boot code)",
    )


def worker_exit(server: Any, worker: Any) -> None:
    """Worker, on its way out: deregister at once and stop the agent."""
    agent = getattr(worker, "hotfleet_agent", None)
    if agent is None:
        return
    # A worker that cannot finish exiting would hold its slot for ever: past EXIT_DEADLINE_S
    # every thread's stack goes to the log and the process ends.
    faulthandler.dump_traceback_later(EXIT_DEADLINE_S, exit=True)
    if agent.membership is not None:
        # The membership key is left to its lease: the successor in this slot (same node
        # id) replaces it within seconds, so a recycled worker is not a node that went
        # down (which inside a rollback window rolls the fleet back).  A worker that is
        # not replaced disappears when the lease expires (HOTFLEET_LEASE_TTL).
        agent.participant.stop()  # state "stopping": a recycle, not a crash (the judge)
        agent.membership.write_now()
        agent.membership.stop(revoke=False)
    agent.stop()


def current_agent() -> Any:
    """This worker's agent (None in the master or before ``post_worker_init``)."""
    return _agent
