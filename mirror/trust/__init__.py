"""What the company trusts: which images may come in through the mirror at all.

`rules.py` owns the pull policy (allow and deny globs per upstream, required platforms from
`platforms.py`), decided before any upstream request. `cosign.py` verifies cosign
signatures — the `sha256-<hex>.sig` tag and sigstore bundles found through the referrers
API — with keys from `keys.py`, bundles read by `bundle.py`, keyless identities checked by
`keyless.py` (sigstore-python) and defensive parsing in `formats.py`; `signatures.py` asks it
for each manifest a `[[policy.signatures]]` rule covers. `scanner.py` owns the scanner gate
(`policy.scan_webhook`): each manifest digest is POSTed to the company's scanner before it
is first served, and its verdict kept by digest. Nothing here answers HTTP: handlers in
`api/` ask, and a refusal is a `Denied` that `errors.py` renders as 403 DENIED. Only
`signatures.py` reads the cache (signature artifacts, through the proxy and the store).
"""
