"""The rendezvous of a run on this machine only, listening on loopback.

torch's TCPStore server (which rank 0 would start on MASTER_PORT) binds every interface whatever MASTER_ADDR says,
so any host that can reach this one could join or disturb the rendezvous. For a local run the launcher instead
hosts the store itself on a socket bound to 127.0.0.1 (TCPStore's `master_listen_fd`) and tells the ranks, with
TORCHELASTIC_USE_AGENT_STORE=True, to connect to it as clients (what torchrun's agent does). GLOO_SOCKET_IFNAME=lo
(unless set) keeps gloo's own connections on loopback too. Multi-node runs need a reachable master and keep
DeepSpeed's default.
"""

from __future__ import annotations

import socket
from datetime import timedelta

LOOPBACK = "127.0.0.1"


class LoopbackStore:
    """A TCPStore on 127.0.0.1:<free port> hosted by this process for as long as the object lives."""

    def __init__(self, timeout_s: int = 1800):
        from torch.distributed import TCPStore

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind((LOOPBACK, 0))
        self.socket.listen(128)
        self.port = self.socket.getsockname()[1]
        self.store = TCPStore(LOOPBACK, self.port, None, True, timedelta(seconds=timeout_s),
                              wait_for_workers=False, master_listen_fd=self.socket.fileno(), use_libuv=True)

    def environment(self) -> dict:
        """Variables that make the ranks use this store instead of starting their own."""
        return {"TORCHELASTIC_USE_AGENT_STORE": "True"}


def loopback_environment(environ: dict) -> dict:
    """GLOO_SOCKET_IFNAME=lo for a local run, unless the user chose an interface."""
    return {} if "GLOO_SOCKET_IFNAME" in environ else {"GLOO_SOCKET_IFNAME": "lo"}
