"""Preloaded clones: restored, reseeded and ready on their link before anyone asks for one.

The pool is three modules: ``protocol`` (the messages), ``server`` (the pool's
process) and ``client`` (what a run and ``vmiso pool stop|status`` ask).

``vmiso pool start`` runs a process that keeps SIZE clones of an image ready:
each is a warm state restored onto a fresh overlay in a run directory of its
own (a bounded, empty ``/out``, an empty inputs disk), its kernel RNG reseeded
and its clock set by the host's hello, ``/tmp`` and ``/out`` mounted, and its
ssh-link ready and waiting for GO on a link the pool holds open.  A run asks the
pool over a Unix socket in the pool's private directory and gets one clone, never
to be reused: its directory, its domain's name and two descriptors (the warm
slot's lock and the open link), then writes the image of its inputs onto that
clone's inputs disk, says GO (the guest mounts the disk on ``/in`` and starts
sshd) and starts SSH on the link.  The pool refills behind it.

Ownership moves in three steps, so that a clone is always somebody's:

1. The pool hands the clone out.  Until then it is the pool's: the directory's
   owner record names the pool's process and a watchdog per clone destroys the
   VM once the pool's process is gone, however it ended.
2. The run records itself as the directory's owner, starts its own watchdog (with
   the run's deadline) and says "taken".
3. The pool releases its watchdog and answers "yours"; only then does the run use
   the clone.  A pool that dies before answering destroys the clone through its
   watchdog, and the run falls back to a warm or cold boot.

A pool checks, every CHECK_SECONDS and before every hand-out, that its clones
still fit: the same template (not re-provisioned, not removed), the same QEMU
(version and binary) and accelerator.  Stale clones are destroyed, never handed
out.  A run whose link fails opens its own, as a warm run does (hello, ready,
GO, then SSH).  No sshd waits on an idle link (it starts at GO), so a link can
wait as long as its clone does.
"""
