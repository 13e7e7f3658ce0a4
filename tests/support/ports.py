"""A free TCP port on the loopback, for the servers the tests start: local mode's own helper, which
picks the ports of the processes standing for pods."""

from kubetune.local import free_port

__all__ = ["free_port"]
