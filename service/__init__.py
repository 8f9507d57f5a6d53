"""The node and the command line: configuration, SCP, spool and job queue, worker, sender, health."""

import logging

__all__: list[str] = []

logging.getLogger(__name__).addHandler(logging.NullHandler())
