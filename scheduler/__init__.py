"""Pure-Python scheduling policy: request state, KV block manager, token-budget scheduler.

Nothing in this package imports torch: it decides, ``engine/`` executes.
"""
