"""Delivery of room frames to WebSockets: one subscription per room per process.

- ``hub``: the per-process room hub (channel layer → ordered, batched frames → local sockets);
- ``writers``: how bytes reach one socket, with its outbound backlog measured in bytes;
- ``inbound``: how much one socket may have waiting to be read by the application.
"""
