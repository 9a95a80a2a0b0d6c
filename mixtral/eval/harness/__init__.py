"""Our model inside EleutherAI's lm-evaluation-harness (PyPI `lm-eval`, an optional extra).

Importing this package registers `MixtralLM` as lm-eval model `mixtral`; `evaluate` runs tasks
offline and returns the scores. lm-eval 0.4.x has no plugin discovery (no entry-point group), so
its own CLI knows `mixtral` only in a process that imported this package, which
`python -m mixtral.eval.harness <lm-eval CLI arguments>` does before handing over to lm-eval:

    python -m mixtral.eval.harness --model mixtral --model_args path=CKPT,dtype=bf16 \\
        --device cpu --tasks mixtral_demo --limit 5

  adapter.py   MixtralLM: lm-eval's LM interface (scores, rolling perplexity, generation)
  prompts.py   chat prompts as strings over the exact ids of Mistral's instruct format
  running.py   `evaluate` (tasks run offline, JSON results) and `go_offline`
  __main__.py  lm-eval's own CLI with `mixtral` registered and our offline tasks included
"""

from mixtral.eval.harness.adapter import MixtralLM
from mixtral.eval.harness.running import TASKS_DIR, evaluate, go_offline

__all__ = ["TASKS_DIR", "MixtralLM", "evaluate", "go_offline"]
