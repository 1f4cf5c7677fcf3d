"""api: the HTTP face of the registry — the route table, thin handlers, responses, access.

Only this folder talks HTTP to clients. It parses and checks what a request says, asks
`cache/` for a response-shaped answer, and renders it; it may import `cache/`, `storage/`
(for typed answers such as a blob's file), `errors`, `metrics`, `reference`, `media`.
"""
