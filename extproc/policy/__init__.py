"""Retry and failover policy as pure functions: no grpc, no protobuf, no I/O, an injected clock.

    classify.py   a provider response → Outcome
    blocks.py     Retry-After blocks on models and providers
    state.py      one request's attempts
    selection.py  which target the next attempt goes to
    decide.py     next_attempt(): retry where and after how long, deliver, or give up
    errors.py     the JSON errors clients see
"""
