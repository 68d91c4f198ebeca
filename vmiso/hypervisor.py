"""The libvirt connection: the one module that imports libvirt.

Callers get a ``Hypervisor`` made from an open connection (``open_hypervisor``
for a real URI, or any object with the same few methods in tests).  Every
``libvirt.libvirtError`` is converted here, with the VM's name added.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import libvirt

from .domain import NAME_PREFIX, metadata_of
from .errors import HypervisorError

log = logging.getLogger(__name__)


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; vmiso reports them itself."""


libvirt.registerErrorHandler(_quiet, None)


@dataclass(frozen=True)
class DomainInfo:
    name: str
    active: bool
    metadata: dict[str, str]


class Hypervisor:
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
        try:
            self.conn.createXML(xml, flags)
        except libvirt.libvirtError as err:
            raise HypervisorError(
                f"libvirt could not start VM {name}: {err.get_error_message()}",
                "run 'vmiso doctor' to check the host",
            ) from None

    def _lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"libvirt could not look up VM {name}: {err.get_error_message()}") from None

    def is_running(self, name: str) -> bool:
        dom = self._lookup(name)
        if dom is None:
            return False
        try:
            return bool(dom.isActive())
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise HypervisorError(f"libvirt could not query VM {name}: {err.get_error_message()}") from None

    def destroy(self, name: str) -> bool:
        """Stop ``name`` at once and forget it; False when it did not exist."""
        dom = self._lookup(name)
        if dom is None:
            return False
        try:
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
        except libvirt.libvirtError as err:
            if err.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                return True
            raise HypervisorError(f"libvirt could not destroy VM {name}: {err.get_error_message()}") from None
        return True

    def shutdown(self, name: str) -> None:
        """Ask the guest to power off (ACPI); see ``wait_stopped``."""
        dom = self._lookup(name)
        if dom is None:
            return
        try:
            dom.shutdown()
        except libvirt.libvirtError as err:
            if err.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                raise HypervisorError(f"libvirt could not shut down VM {name}: {err.get_error_message()}") from None

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
        try:
            dom.save(str(path))
        except libvirt.libvirtError as err:
            raise HypervisorError(f"libvirt could not save VM {name}: {err.get_error_message()}") from None

    def saved_xml(self, path: Path) -> str:
        try:
            return self.conn.saveImageGetXMLDesc(str(path), libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE)
        except libvirt.libvirtError as err:
            raise HypervisorError(f"libvirt cannot read the saved state {path}: {err.get_error_message()}") from None

    def restore(self, name: str, path: Path, xml: str) -> None:
        """Start ``name`` from a saved state, with ``xml`` (the saved one retargeted)."""
        try:
            self.conn.restoreFlags(str(path), xml, libvirt.VIR_DOMAIN_SAVE_RUNNING)
        except libvirt.libvirtError as err:
            raise HypervisorError(f"libvirt could not restore VM {name} from {path}: "
                                  f"{err.get_error_message()}") from None

    def vmiso_domains(self) -> list[DomainInfo]:
        """Every domain whose name marks it as vmiso's, with its metadata."""
        try:
            domains = self.conn.listAllDomains(0)
        except libvirt.libvirtError as err:
            raise HypervisorError(f"libvirt could not list VMs: {err.get_error_message()}") from None
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
        try:
            lib = self.conn.getLibVersion()
            qemu = self.conn.getVersion()
        except libvirt.libvirtError as err:
            raise HypervisorError(f"libvirt at {self.uri} does not answer: {err.get_error_message()}") from None
        return f"libvirt {lib // 1000000}.{lib // 1000 % 1000}, QEMU {qemu // 1000000}.{qemu // 1000 % 1000}"


def open_hypervisor(uri: str) -> Hypervisor:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise HypervisorError(
            f"cannot connect to libvirt at {uri}: {err.get_error_message()}",
            "start the daemons (scripts/setup-host does) or set libvirt_uri in vmiso.yaml",
        ) from None
    return Hypervisor(conn, uri)


@contextmanager
def connected(uri: str) -> Iterator[Hypervisor]:
    hv = open_hypervisor(uri)
    try:
        yield hv
    finally:
        hv.close()
