"""Runs on a node reached over SSH (``vmiso --host ssh://NODE``).

protocol.py   the framed stream both sides speak over the ssh process's stdin and stdout
openssh.py    the analyst's own OpenSSH client: the argv, the process (the one outside program here)
transfer.py   trees (inputs, outputs) as frames, and received with the local refusals and bounds
client.py     the Execution that drives a node (``SshNode``): the analyst's side
server.py     the node's side, ``vmiso _node``: one run on this host, its streams framed
"""
