"""cluster: what several replicas coordinate through Redis — who evicts (a lease), which
blobs each replica is sending now (so eviction on one never pulls a blob from under
another's reader), and which replicas are alive.

It speaks only to Redis (redis-py's asyncio client); `cache/` asks it, and nothing here
imports `cache/` or `api/`. Every failure to reach Redis is logged and answered safely:
no lease means no eviction pass, not two.
"""
