"""``python -m service`` runs the server (like the ``capsa-serve`` console script).

The import is guarded: worker processes (multiprocessing "spawn") re-import this module as ``__mp_main__``.
"""

if __name__ == "__main__":
    import sys

    from service.cli import main

    sys.exit(main())
