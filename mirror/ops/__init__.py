"""ops: the operator's commands — prefetch, export and import, ls and du, gc and verify,
TLS certificates, progress display.

They open storage through the same `storage/` interfaces as the server, so a command run
beside a live server follows the server's own rules.
"""
