"""Infrastructure shared by the ``chat`` and ``notifications`` apps.

Internal: host sites install it with the apps but configure nothing here. Each module is one
concept (draining on shutdown, per-user leases, ...); neither app imports the other, both
import this.
"""
