"""Series processed by many workers on many hosts: Celery on RabbitMQ (``[queue] broker``).

Without a broker the node keeps its own worker processes (``service/worker.py``); with one,
the node publishes each complete series version as a task and fleet workers
(``liverfat worker``) process it from storage they share with the node.
"""
