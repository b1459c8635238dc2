"""Jobs: a method run end to end (run directory, ``config.json``, ``metrics.jsonl``, resume, progress, report).

A job strings together training stages (``train/``), evaluations (``eval/``) and the papers' math (``methods/``);
the entry points (``python -m vlsafe_jax.{train,evaluate,uwm,cmrm,tga}``) only parse the command line and call one.
"""
