"""Test support: a real upstream (Distribution + a token server), seeded images, a fault proxy.

Start with `stack.Upstream`, or the `upstream` fixture in `fixtures.py`.
"""
