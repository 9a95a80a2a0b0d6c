"""`MixtralLM`: our model behind lm-eval's LM interface, registered as lm-eval model `mixtral`.

This module is the one place the registration runs (lm-eval refuses a second class under the
same name), so everything reaches the class through here: `mixtral.eval.harness` re-exports it.

Tokenization follows lm-eval's HFLM on Mistral's HF tokenizer (which adds BOS): a context is
BOS + its text; `context + continuation` is encoded whole and split at the context's token
count, with trailing spaces of the context moved to the continuation (`TemplateLM._encode_pair`);
an empty context is BOS alone. Rolling perplexity scores the text's own tokens (no BOS in
them) in disjoint windows after a BOS prefix, so every token is predicted exactly once. Chat
prompts (`apply_chat_template=True`) are strings over Mistral's exact ids (`prompts.py`); a
continuation after a chat context is encoded on its own, as the Instruct format encodes an
assistant message.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypeVar

import lm_eval
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mixtral.completion import Delta, TextJob
from mixtral.engine import Engine
from mixtral.eval.harness.prompts import EOS_TEXT, ChatPrompts
from mixtral.generate import GenerationParams
from mixtral.model import Transformer
from mixtral.tokenizer import Tokenizer, default_tokenizer

log = logging.getLogger(__name__)

MODEL_ARGS = ("path", "dtype", "device", "batch_size", "max_length", "max_gen_toks", "reference",
              "max_ram")
# generation kwargs we honour (lm-eval normalises the max_* aliases); others (top_k,
# repetition_penalty...) are HF-specific and ignored with a warning
GEN_KWARGS = {"until", "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens",
              "do_sample", "temperature", "top_p", "seed"}

T = TypeVar("T", bound="MixtralLM")
Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


@register_model("mixtral")
class MixtralLM(TemplateLM):
    """lm-eval's LM interface over a `mixtral` Transformer.

    model_args (strings from the CLI): path (a checkpoint; omitted or `default`: the built-in
    default model), dtype, device, batch_size (sequences per forward pass / engine batch),
    max_length (context, at most the model's), max_gen_toks (default when a task sets none),
    reference (true: keep model.py's reference modules instead of mixtral.fast's), max_ram
    (experts paged from disk, see `mixtral.load`). In Python, `model=` and `tokenizer=` take
    built objects instead of a path."""

    backend = "causal"

    def __init__(self, path: str | None = None, *, model: Transformer | None = None,
                 tokenizer: Tokenizer | None = None, dtype: str | None = None,
                 device: str | None = None, batch_size: int | str = 1,
                 max_length: int | None = None, max_gen_toks: int = 256,
                 reference: bool = False, max_ram: str | None = None,
                 max_batch_size: int | None = None) -> None:
        # max_batch_size: lm-eval passes it for automatic batch sizing, which we do not do
        super().__init__()
        if path is not None and model is not None:
            raise ValueError(f"give a checkpoint path or a built model, not both (path={path!r})")
        self.tokenizer = tokenizer or default_tokenizer()
        self.batch_size = _positive_int("batch_size", batch_size)
        self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        wanted = None if max_length is None else _positive_int("max_length", max_length)
        if model is None:
            model = _load(path, dtype, _usable_device(device), reference, max_ram)
        self.model = model
        self._device = model.device
        self._max_length = wanted or model.args.max_seq_len
        if self._max_length > model.args.max_seq_len:
            raise ValueError(f"max_length={max_length} exceeds the model's context of "
                             f"{model.args.max_seq_len}")
        self._chat = ChatPrompts(self.tokenizer)
        self._ignored: set[str] = set()  # generation kwargs already warned about

    @classmethod
    def create_from_arg_string(cls: type[T], arg_string: str,
                               additional_config: dict[str, Any] | None = None) -> T:
        return cls.create_from_arg_obj(lm_eval.utils.simple_parse_args_string(arg_string),
                                       additional_config)

    @classmethod
    def create_from_arg_obj(cls: type[T], arg_dict: dict[str, Any],
                            additional_config: dict[str, Any] | None = None) -> T:
        unknown = sorted(set(arg_dict) - set(MODEL_ARGS))
        if unknown:
            raise ValueError(f"unknown model_args key(s) for model 'mixtral': "
                             f"{', '.join(unknown)}; known: {', '.join(MODEL_ARGS)}")
        # lm-eval's CLI always passes device (default cuda:0) and batch_size: model_args win
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    # --- what lm-eval reads ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return f"mixtral-sentencepiece-{self.tokenizer.model_file.name}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        # lm-eval records (and hashes) this; the template itself is mistral-common's code
        return "mistral-common InstructTokenizerV1" if chat_template else None

    def get_model_info(self) -> dict[str, Any]:
        return {"model_args_dict": {"max_length": self.max_length},
                "model_config": self.model.args.to_dict()}

    # --- tokens ----------------------------------------------------------------------------

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        """BOS + the text's ids (no BOS with add_special_tokens=False); a chat rendering is
        returned as its exact ids."""
        chat = self._chat.ids(string)
        if chat is not None:
            return chat
        return self.tokenizer.encode(string, bos=add_special_tokens is not False)

    def _encode_pair(self, context: str, continuation: str) -> Pair:
        chat = self._chat.ids(context)
        if chat is not None:  # the answer is encoded alone, as an assistant message is
            return chat, self.tokenizer.encode(continuation, bos=False)
        return super()._encode_pair(context, continuation)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self._chat.render(chat_history, add_generation_prompt)

    # --- scoring ---------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(request key, context ids, continuation ids) -> (sum of the continuation's
        log-probabilities, whether greedy decoding reproduces it), in the requests' order."""
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        # longest first, as lm-eval does: a batch is padded to its first row
        order = sorted(range(len(pairs)),
                       key=lambda i: (-len(pairs[i][0]) - len(pairs[i][1]), pairs[i]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            for i, score in zip(batch, self._score([pairs[i] for i in batch]), strict=True):
                results[i] = score
        for (key, _, _), score in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, score)
        return results

    @torch.inference_mode()
    def _score(self, pairs: list[Pair]) -> list[tuple[float, bool]]:
        """One forward pass over right-padded rows (causal attention: padding after a row's
        end cannot change its logits)."""
        longest = max(len(cont) for _, cont in pairs)
        if longest > self.max_length:
            raise ValueError(f"a continuation of {longest} tokens exceeds max_length "
                             f"{self.max_length}")
        # the last token is only predicted; truncate from the left to the context window
        rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for ctx, cont in pairs]
        width = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row)
        logits = self.model(tokens.to(self._device))
        assert isinstance(logits, torch.Tensor)
        out = []
        for i, (row, (_, cont)) in enumerate(zip(rows, pairs, strict=True)):
            if not cont:
                out.append((0.0, True))
                continue
            # position p predicts token p + 1: the continuation's logits end at the row's end
            scores = logits[i, len(row) - len(cont):len(row)].log_softmax(-1)  # [n, V]
            target = torch.tensor(cont, device=scores.device)
            logprob = scores.gather(-1, target[:, None]).sum()
            out.append((float(logprob), bool((scores.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests: list[Instance],
                              disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[int, list[int], list[int]]] = []  # (request, context, predicted)
        for n, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((n, ctx, cont))
        scores = self._loglikelihood_tokens([(None, ctx, cont) for _, ctx, cont in windows])
        totals = [0.0] * len(requests)
        for (n, _, _), (logprob, _) in zip(windows, scores, strict=True):
            totals[n] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """All requests go through one continuous-batching engine, `batch_size` at a time;
        each stops at EOS, at `max_gen_toks` or as soon as its text holds a stop string."""
        jobs = [self._generation_job(context, gen_kwargs)
                for context, gen_kwargs in (req.args for req in requests)]
        if not jobs:
            return []
        # the KV cache holds max_batch rows of this many positions: no more than needed
        context = min(self.max_length, max(len(p) + (g.max_tokens or 0) for p, g, _ in jobs))
        engine = Engine(self.model, max_queue=len(jobs), max_batch=min(self.batch_size, len(jobs)),
                        max_seq_len=context, thread=False)
        texts = [""] * len(jobs)
        errors: list[BaseException] = []
        # longest prompts first: they take longest, the short ones fill the freed slots
        for i in sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0])):
            prompt, params, until = jobs[i]
            self._submit(engine, i, prompt, params, until, texts, errors)
        engine.run(until_idle=True)
        if errors:
            raise RuntimeError(f"generation failed: {errors[0]}") from errors[0]
        for req, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    def _generation_job(self, context: str,
                        gen_kwargs: dict[str, Any]) -> tuple[list[int], GenerationParams,
                                                             tuple[str, ...]]:
        """-> (prompt ids, sampling parameters, stop strings) of one request."""
        ignored = set(gen_kwargs) - GEN_KWARGS - self._ignored
        if ignored:
            log.warning("mixtral: ignoring generation kwargs %s", ", ".join(sorted(ignored)))
            self._ignored |= ignored
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.get("until"), eos=EOS_TEXT)
        new = kwargs["max_gen_toks"]
        room = self.max_length - new
        if room < 1:
            raise ValueError(f"max_gen_toks={new} leaves no room for a prompt within "
                             f"max_length={self.max_length}")
        prompt = self.tok_encode(context)[-room:]  # keep the end of a long prompt
        temperature = 0.0
        if kwargs["do_sample"]:  # HF's default temperature when sampling is 1
            temperature = float(kwargs.get("temperature", 1.0))
        seed = kwargs.get("seed")
        if seed is None and temperature > 0:  # from the RNG lm-eval seeds: reproducible runs
            seed = int(torch.randint(0, 2**62, ()))
        params = GenerationParams(max_tokens=new, temperature=temperature,
                                  top_p=float(kwargs.get("top_p", 1.0)), seed=seed,
                                  stop_ids=(self.tokenizer.eos_id,))
        return prompt, params, tuple(until)

    def _submit(self, engine: Engine, i: int, prompt: list[int], params: GenerationParams,
                until: tuple[str, ...], texts: list[str], errors: list[BaseException]) -> None:
        def emit(delta: Delta) -> None:
            texts[i] += delta.text

        answer = TextJob(self.tokenizer, len(prompt), params.stop_ids, until, emit=emit,
                         fail=errors.append)
        answer.job = engine.submit(prompt, params, answer.on_token, answer.on_done)


# --- construction helpers ------------------------------------------------------------------------

def _positive_int(name: str, value: int | str) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        raise ValueError(f"{name}={value!r}: automatic batch sizing is not supported; give a "
                         "number")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1 or number != float(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def _usable_device(device: str | None) -> str:
    """lm-eval's CLI asks for cuda:0 unless told otherwise; without CUDA, use the CPU."""
    if device is None:
        return "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("mixtral: device %s requested but CUDA is not available; using cpu", device)
        return "cpu"
    return str(device)


def _load(path: str | None, dtype: str | None, device: str, reference: bool,
          max_ram: str | None) -> Transformer:
    from mixtral.assemble import assemble

    default = path is None or str(path) == "default"
    if not default and not Path(str(path)).exists():
        raise FileNotFoundError(f"model_args path={path!r}: no such checkpoint")
    # the fast modules, as every mixtral command uses unless --reference
    return assemble(None if default else str(path), dtype=dtype, device=device,
                    max_ram=max_ram, fast=not reference,
                    announce=lambda label: log.warning("mixtral: %s", label))
