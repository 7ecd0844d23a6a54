"""Retry and failover policy as pure functions: no grpc, no protobuf, no I/O, an injected clock.

    classify.py   a provider response (status, error body) → Outcome, and what the error means
    state.py      one request's attempts, its deadline and its own blocks
    selection.py  which targets a strategy may pick next
    decide.py     first_target(), next_attempt(): retry where and after how long, deliver, or give
                  up — every 429, 5xx, timeout and key failure is decided there, in one function
    effects.py    what a decision changes (blocks, key states, a pacing slot), as values, and apply()
    pacing.py     delayed retries to one target spread out
    errors.py     the error of a request that gave up
"""
