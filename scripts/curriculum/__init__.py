"""The training curriculum of issue 17: tasks that teach a mechanism, not a surface.

`tasks.py` holds one generator per task, `scripts/build_curriculum.py` mixes them into stages.
Values come only from the training split of `scripts/values/` (and from random spans of the
tokenizer's whole vocabulary); the evaluation generator `scripts/heldout/` is never imported.
"""

# The training order, once: scripts/train_default.sh trains these in turn, each from the one
# before it (recipes/default/ for the first two, recipes/curriculum/ for the rest);
# scripts/build_curriculum.py mixes the SFT stages' data, ship_default.py reads every stage
ORDER = ("induction", "pretrain", "copy", "json", "skills", "sums", "numbers", "requests",
         "final", "dpo")
SFT_STAGES = ORDER[2:-1]
