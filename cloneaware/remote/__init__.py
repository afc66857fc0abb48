"""ssh:// targets: the client (remote/client.py) and ``cloneaware serve``
(remote/server.py)."""
