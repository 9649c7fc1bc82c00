"""capsa-serve: predictions with per-sample risk over KServe V2 REST, from worker processes, with dynamic batching.

Kept free of heavy imports: worker processes import this package too.
"""

__version__ = "0.1.0"
