"""The training curriculum of issue 17: tasks that teach a mechanism, not a surface.

`tasks.py` holds one generator per task, `scripts/build_curriculum.py` mixes them into stages.
Values come only from the training split of `scripts/values/` (and from random spans of the
tokenizer's whole vocabulary); the evaluation generator `scripts/heldout/` is never imported.
"""
