"""cache: what is answered locally and what is fetched — pull-through policy, fills, hosted
repositories, the byte budget.

It speaks in registry terms (names, references, digests), never HTTP; it reads and writes
only through `storage/` interfaces, asks `upstream/` for anything remote and, with several
replicas, `cluster/` which replica fetches what.
"""
