"""SSH to a guest over its virtio-serial link: the one module that imports paramiko.

The host key is pinned (the public half recorded when the image was sealed);
an unknown or different key is refused, never added.  No agent, no keys from
``~/.ssh``: only the image's own client key.  Output is streamed as it arrives.
"""

from __future__ import annotations

import base64
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import paramiko

from .errors import GuestError

log = logging.getLogger(__name__)

# The name under which the pinned key is stored; the link is a socket, not a host.
GUEST_HOST = "vmiso-guest"
# Fresh randomness sent before SSH to a restored clone: its ssh-link reseeds the kernel
# RNG with it, so that clones restored from one saved state do not share random numbers.
# (A cold clone seeded its RNG from virtio-rng at boot.)
SEED_BYTES = 64
NO_STATUS = -1


class HostKeyMismatch(GuestError):
    """The guest presented a host key other than the pinned one."""


def _pinned_key(line: str) -> paramiko.PKey:
    try:
        key_type, blob = line.split()[:2]
        return paramiko.PKey.from_type_string(key_type, base64.b64decode(blob))
    except (ValueError, paramiko.SSHException) as err:
        raise GuestError(f"the image's recorded host key is unreadable: {err}") from None


class Session:
    def __init__(self, client: paramiko.SSHClient, name: str) -> None:
        self._client = client
        self._name = name

    def close(self) -> None:
        self._client.close()

    def execute(self, command: str, stdout: BinaryIO, stderr: BinaryIO, *,
                deadline: float | None = None, should_stop: Callable[[], bool] = lambda: False) -> int | None:
        """Run ``command``, streaming its output; its exit status, or None when stopped.

        Returns None when ``deadline`` passed or ``should_stop`` said so; -1 when the
        command ended without an exit status (killed by a signal).
        """
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise GuestError(f"the SSH link to {self._name} is closed")
        try:
            channel = transport.open_session(timeout=30)
            channel.exec_command(command)
            channel.shutdown_write()  # the job reads EOF on stdin
        except (paramiko.SSHException, OSError) as err:
            raise GuestError(f"cannot start the job in {self._name}: {err}") from None
        try:
            while True:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                if should_stop():
                    return None
                select.select([channel], [], [], 0.2)
                drained = False
                while channel.recv_ready():
                    stdout.write(channel.recv(65536))
                    drained = True
                while channel.recv_stderr_ready():
                    stderr.write(channel.recv_stderr(65536))
                    drained = True
                if drained:
                    stdout.flush()
                    stderr.flush()
                if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
                    # The status arrives before the last data only when the stream is closed.
                    if channel.eof_received or channel.closed:
                        return channel.recv_exit_status()
                if channel.closed and not channel.exit_status_ready():
                    if not transport.is_active():
                        raise GuestError(f"the SSH link to {self._name} broke while the job ran")
                    return NO_STATUS
        finally:
            channel.close()


def connect(socket_path: Path, *, name: str, host_key: str, client_key: Path, user: str,
            deadline: float, alive: Callable[[], bool], seed: bool) -> Session:
    """Connect once the guest answers; ``alive`` says whether the VM still runs.

    ``seed``: send SEED_BYTES first, as a clone restored from a warm state expects.
    """
    pinned = _pinned_key(host_key)
    try:
        key = paramiko.Ed25519Key.from_private_key_file(str(client_key))
    except (OSError, paramiko.SSHException) as err:
        raise GuestError(f"cannot read the image's client key {client_key}: {err}") from None
    last_error = "no answer"
    while time.monotonic() < deadline:
        if not alive():
            raise GuestError(f"VM {name} stopped before it answered SSH")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(socket_path))
            if seed:
                sock.sendall(os.urandom(SEED_BYTES))
        except OSError as err:
            sock.close()
            last_error = str(err)
            time.sleep(0.05)
            continue
        client = paramiko.SSHClient()
        client.get_host_keys().add(GUEST_HOST, pinned.get_name(), pinned)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        remaining = max(1.0, deadline - time.monotonic())
        try:
            client.connect(GUEST_HOST, username=user, pkey=key, sock=sock, allow_agent=False,
                           look_for_keys=False, timeout=remaining, banner_timeout=remaining,
                           auth_timeout=30, channel_timeout=30)
            return Session(client, name)
        except paramiko.BadHostKeyException as err:
            client.close()
            raise HostKeyMismatch(
                f"VM {name} presented host key {err.key.get_fingerprint().hex()}, not the pinned one; "
                "refusing to talk to it",
                "the image may have been tampered with: verify or re-provision it",
            ) from None
        except paramiko.AuthenticationException as err:
            client.close()
            raise GuestError(f"VM {name} refused the image's client key: {err}") from None
        except (paramiko.SSHException, OSError, EOFError) as err:
            client.close()
            last_error = str(err) or type(err).__name__
            log.debug("SSH to %s not ready: %s", name, last_error)
            time.sleep(0.2)
    raise GuestError(f"VM {name} did not answer SSH in time ({last_error})")
