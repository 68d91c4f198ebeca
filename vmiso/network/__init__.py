"""The way out: the gateway a networked run or a provisioning gets, and nothing else.

    allow.py    what a gateway may reach: allow-lists parsed and checked (vmiso.config uses it)
    gateway.py  the gateway itself, in vmiso's process, served over the clone's SSH link
    record.py   what a gateway leaves: its record, summarized, kept as an image's record
"""
