"""The host side: the state directory and what vmiso keeps in it, and what crosses into a guest and out.

    state.py       the state directory's one owner: every path in it is spelled here
    workdir.py     host directories QEMU must reach: modes, ACLs, owner records, locks, removal
    sharemount.py  the share helper: a bounded writable share (also a program of its own, run by sudo)
    tree.py        walking and removing guest-shaped trees by descriptor
    reaper.py      what dead vmiso processes left behind, as each owner describes it
    inputs.py      what goes in: -i staged as a copy
    outputs.py     what comes out: /out checked and copied
"""
