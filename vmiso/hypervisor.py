"""The libvirt connection: the one module that imports libvirt.

``Libvirt`` is the real vmiso.domain.Hypervisor (the Protocol the core asks for;
tests hand in a fake), made from an open connection by ``open_hypervisor`` or
``connected``.  Every ``libvirt.libvirtError`` is converted here, with the VM's
name added.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import libvirt

from .domain import NAME_PREFIX, DomainInfo, Hypervisor, metadata_of
from .errors import HypervisorError

log = logging.getLogger(__name__)


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; vmiso reports them itself."""


libvirt.registerErrorHandler(_quiet, None)


# Errors that mean the domain is gone, or was never running: not failures for the
# operations that tolerate them.
_GONE = (libvirt.VIR_ERR_NO_DOMAIN,)
_GONE_OR_STOPPED = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)


@contextmanager
def _libvirt(action: str, *, hint: str | None = None, tolerate: tuple[int, ...] = ()) -> Iterator[None]:
    """Convert a libvirtError in the block into a HypervisorError that says what failed.

    An error whose code is in ``tolerate`` ends the block silently; the code after
    the ``with`` statement then says what that means.
    """
    try:
        yield
    except libvirt.libvirtError as err:
        if err.get_error_code() in tolerate:
            return
        raise HypervisorError(f"{action}: {err.get_error_message()}", hint) from None


class Libvirt(Hypervisor):
    """A libvirt connection, as vmiso uses it."""

    def __init__(self, conn: libvirt.virConnect, uri: str) -> None:
        self.conn = conn
        self.uri = uri

    def close(self) -> None:
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass

    def start_transient(self, name: str, xml: str, *, autodestroy: bool = True) -> None:
        """Create and start a domain that exists only while it runs.

        With ``autodestroy`` libvirt destroys it when this connection closes, so a
        vmiso that dies (even by SIGKILL) does not leave the VM running.
        """
        flags = libvirt.VIR_DOMAIN_START_AUTODESTROY if autodestroy else 0
        with _libvirt(f"libvirt could not start VM {name}", hint="run 'vmiso doctor' to check the host"):
            self.conn.createXML(xml, flags)

    def _lookup(self, name: str) -> libvirt.virDomain | None:
        with _libvirt(f"libvirt could not look up VM {name}", tolerate=_GONE):
            return self.conn.lookupByName(name)
        return None

    def is_running(self, name: str) -> bool:
        dom = self._lookup(name)
        if dom is None:
            return False
        with _libvirt(f"libvirt could not query VM {name}", tolerate=_GONE):
            return bool(dom.isActive())
        return False

    def destroy(self, name: str) -> bool:
        """Stop ``name`` at once and forget it; False when it did not exist."""
        dom = self._lookup(name)
        if dom is None:
            return False
        with _libvirt(f"libvirt could not destroy VM {name}", tolerate=_GONE_OR_STOPPED):
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
        return True

    def destroy_run(self, name: str, run_dir: str) -> Literal["destroyed", "absent", "another run's"]:
        """Destroy ``name`` only while it is still the VM of ``run_dir``.

        A restored domain keeps its saved name (and UUID), which the next run from
        that slot takes on; so the domain checked is then destroyed by its numeric
        ID, which libvirt never gives to another domain while it runs.
        """
        dom = self._lookup(name)
        if dom is None:
            return "absent"
        with _libvirt(f"libvirt could not inspect VM {name}", tolerate=_GONE_OR_STOPPED):
            domain_id = dom.ID()
            if metadata_of(dom.XMLDesc(0)).get("run_dir") != run_dir:
                return "another run's"
            if domain_id < 0:
                return "absent"  # defined but not running: nothing to stop
            with _libvirt(f"libvirt could not destroy VM {name}", tolerate=_GONE_OR_STOPPED):
                self.conn.lookupByID(domain_id).destroy()
            return "destroyed"
        return "absent"

    def shutdown(self, name: str) -> None:
        """Ask the guest to power off (ACPI); see ``wait_stopped``."""
        dom = self._lookup(name)
        if dom is None:
            return
        with _libvirt(f"libvirt could not shut down VM {name}", tolerate=_GONE_OR_STOPPED):
            dom.shutdown()

    def wait_stopped(self, name: str, timeout: float, poll: float = 0.5) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.is_running(name):
                return True
            time.sleep(poll)
        return not self.is_running(name)

    def save(self, name: str, path: Path) -> None:
        """Save a running domain's memory and device state to ``path``; the domain stops."""
        dom = self._lookup(name)
        if dom is None:
            raise HypervisorError(f"VM {name} does not exist; nothing to save")
        with _libvirt(f"libvirt could not save VM {name}"):
            dom.save(str(path))

    def saved_xml(self, path: Path) -> str:
        with _libvirt(f"libvirt cannot read the saved state {path}"):
            xml: str = self.conn.saveImageGetXMLDesc(str(path), libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE)
        return xml

    def restore(self, name: str, path: Path, xml: str) -> None:
        """Start ``name`` from a saved state, with ``xml`` (the saved one retargeted)."""
        with _libvirt(f"libvirt could not restore VM {name} from {path}"):
            self.conn.restoreFlags(str(path), xml, libvirt.VIR_DOMAIN_SAVE_RUNNING)

    def vmiso_domains(self) -> list[DomainInfo]:
        """Every domain whose name marks it as vmiso's, with its metadata."""
        with _libvirt("libvirt could not list VMs"):
            domains = self.conn.listAllDomains(0)
        found = []
        for dom in domains:
            try:
                name = dom.name()
                if not name.startswith(NAME_PREFIX):
                    continue
                found.append(DomainInfo(name, bool(dom.isActive()), metadata_of(dom.XMLDesc(0))))
            except libvirt.libvirtError:
                continue  # it went away while we looked
        return found

    def version(self) -> str:
        with _libvirt(f"libvirt at {self.uri} does not answer"):
            lib = self.conn.getLibVersion()
            qemu = self.conn.getVersion()
        return f"libvirt {lib // 1000000}.{lib // 1000 % 1000}, QEMU {qemu // 1000000}.{qemu // 1000 % 1000}"


def open_hypervisor(uri: str) -> Libvirt:
    with _libvirt(f"cannot connect to libvirt at {uri}",
                  hint="start the daemons (scripts/setup-host does) or set libvirt_uri in vmiso.yaml"):
        conn = libvirt.open(uri)
    return Libvirt(conn, uri)


@contextmanager
def connected(uri: str) -> Iterator[Libvirt]:
    hv = open_hypervisor(uri)
    try:
        yield hv
    finally:
        hv.close()
