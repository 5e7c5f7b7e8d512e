"""Benchmarks (not tests): the engine against its peers, memory scaling, shared Hessians.

Run them all with ``make bench`` (``python -m bench.run_all``); the latest output
lives in bench/RESULTS.md. Peer tools get their own virtualenvs under bench/.cache/venvs/.
"""
