"""Offline lm-evaluation-harness tasks shipped with the package (data written for this project).

    mixtral_mc_demo     20 multiple-choice questions, `acc` / `acc_norm`
    mixtral_arith_demo  20 "What is a + b?" items, greedy generation; `exact_match` on the
                        first number of the answer
    mixtral_ppl_demo    6 short paragraphs, rolling log-likelihood: `word_perplexity`,
                        `byte_perplexity`, `bits_per_byte`
    mixtral_demo        the tag that runs all three

They are smoke tests of the whole path (tokenizer, adapter, lm-eval, metrics), not benchmarks.
`mixtral.eval.harness.evaluate` indexes this folder; with lm-eval's own CLI pass
`--include_path` with this folder's path. The data sits in `*.json` next to the YAMLs and is read
by `offline_data.py` relative to its own file, so any working directory and a non-editable
install work.

Pointing a built-in task (mmlu, gsm8k, hellaswag, arc_easy, ...) at a local copy of its data
-----------------------------------------------------------------------------------------
Every real benchmark in lm-eval names a Hugging Face hub dataset, which these machines cannot
reach. Write a YAML of your own that `include:`s the bundled config (prompt, few-shot count,
filters and metrics are kept) and swaps only the data source, then pass its folder as an
include path (`evaluate(..., include_path=[DIR])`, or `--include_path DIR`):

    include: /ABSOLUTE/PATH/TO/site-packages/lm_eval/tasks/gsm8k/gsm8k.yaml
    task: gsm8k_local           # a new name: the bundled one still points at the hub
    dataset_path: json          # the `datasets` JSON builder: no download
    dataset_name: null
    dataset_kwargs:
      data_files:
        train: /ABSOLUTE/PATH/gsm8k/train.jsonl
        test: /ABSOLUTE/PATH/gsm8k/test.jsonl

`include:` and `data_files` paths must be absolute: lm-eval resolves a relative `include` against
the YAML's folder but relative `data_files` against the *current working directory*. Print the
bundled folder with `python -c "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"`.
Split names must be the ones the bundled config uses (its `test_split`, `validation_split`,
`training_split`, `fewshot_split`). The rows must follow the hub dataset's schema:

    gsm8k      {"question": str, "answer": str ending in "#### <number>"}; splits train, test
    mmlu_<s>   {"question": str, "choices": [4 str], "answer": int 0-3}; splits test and dev
               (few-shot examples: the first of dev; num_fewshot=5 for the paper's setting);
               include mmlu/default/mmlu_<subject>.yaml
    hellaswag  {"ctx_a": str, "ctx_b": str, "activity_label": str, "endings": [4 str],
                "label": "0".."3"}; splits train, validation (it scores validation)
    arc_easy   {"question": str, "choices": {"text": [str], "label": ["A", ...]},
                "answerKey": "A"}; splits train, validation, test (same for arc_challenge)

Ready-made templates of these four are in `mixtral/eval/task_templates/` (outside this folder so
that their placeholder paths are never indexed): copy one, fill in the paths, and include its
folder. This module imports nothing: lm-eval loads `offline_data.py` by path.
"""
