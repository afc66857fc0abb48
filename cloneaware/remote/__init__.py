"""ssh:// targets: the client (remote/client.py), which runs the system's
ssh with ``cloneaware serve`` (cloneaware/serve.py) at the other end."""
