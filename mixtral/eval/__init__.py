"""What the Mixtral paper measures, for any model we load: passkey retrieval (`passkey`),
perplexity against context length (`perplexity`), router statistics (`routing`), and the
EleutherAI lm-evaluation-harness adapter (`harness`, needs the optional `lm-eval` extra).
`report` writes results atomically and appends each run to a JSONL log; `figures` draws them;
`commands` is `mixtral eval ...`."""
