"""cache: what is answered locally and what is fetched — pull-through policy, fills, hosted
repositories, the byte budget.

It speaks in registry terms (names, references, digests), never HTTP; it reads and writes
only through `storage/` interfaces and asks `upstream/` for anything remote.
"""
