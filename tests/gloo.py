"""Setting up a local gloo process group in spawned test workers."""

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def use_local_master(port: int) -> None:
    """Environment ``init_process_group("gloo", rank=r, world_size=w)`` reads to meet the other ranks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
