"""The corpus builder behind scripts/build_corpus.py, one module per source or family.

``text`` and ``packages`` are what every source uses (cleaning, fetching archives); one module
per source reads its archive into ``Document``s; ``sources`` lists them; ``builder`` fetches and
caches; ``pretrain`` and ``artifacts`` write the outputs. scripts/ is on ``sys.path`` when the
script runs, so the package is imported as ``corpus``.
"""
