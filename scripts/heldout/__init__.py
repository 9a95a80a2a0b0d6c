"""The evaluation generator of issue 17: in-distribution and out-of-distribution test sets.

`sets.py` builds them; `scripts/eval_heldout.py` runs them through `mixtral serve` and the
official client. It reads only the evaluation split of `scripts/values/`, never the training
split, and the training generators never import it.
"""
