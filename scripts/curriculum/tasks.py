"""One generator per curriculum task. Each takes a seeded `random.Random` and returns
(messages, answer, rejected answers), the shape scripts/build_instruct_data.py writes.

  copy            repeat a random span of the whole vocabulary, so that copying does not
                  depend on which pieces a value uses;
  json            a JSON object from key/value lists of every shape: 1-8 fields, keys and
                  values from the training lists, numbers, made-up words and vocabulary spans,
                  several separators, and instructions built from parts
                  (curriculum/instructions.py) before, after or around the lines;
  example         the source document's own JSON example, word for word;
  passkey         a number hidden at any depth of filler of any length up to the context;
  passkey_short   the same in a short filler (up to ~90 tokens) with keys of 5-8 digits,
                  asked in many phrasings (as are the two below);
  passkey_full    the same, the filler drawn in tokens, so that many rows fill the context;
  passkey_long    passkey_full with keys of 5-8 digits, half of them of 2-4 distinct digits;
  arith_practice  two-digit addition written out digit by digit, with carries;
  arith_plain     the plain sum, the form the evaluation asks for;
  arith_words     the same asked in words ("plus", "add", "total") and other sentences;
  safety, harm    requests in pairs that differ only in harm, with and without the safe
                  prompt (curriculum/safety.py);
  text            plain text: a passage of the pretraining corpus, trained on whole (a
                  {"text": ...} row, not a chat), so that every fine-tuning stage keeps text
                  modelling alive.

And two for the stages before any of these:

  induction       token ids, not text: [BOS, span, span, noise] with a span of pieces drawn
                  uniformly from the whole vocabulary and the loss on its repeat only. The
                  warm-up (recipes/default/induction.yaml) forms induction heads on these:
                  issue 17's pilots found the loss on the unpredictable pieces, or spans of
                  common pieces, left the heads unformed or copying by position.

  repeats         a document that is one short span shown over and over (corpus words or
                  pieces of the whole vocabulary), mixed into pretraining so that the heads
                  the warm-up formed stay in use (issue 17: natural text alone, 5M tokens of
                  it, left the repeat of a span as hard to predict as its first showing; these
                  documents alone, as a warm-up, formed no heads in 700 steps).
"""

from __future__ import annotations

import json
import random
from functools import cache

import build_instruct_data as shipped
from values import load

from curriculum.instructions import json_instruction
from mixtral import chat
from mixtral.tokenizer import default_tokenizer

Example = tuple[list[dict[str, str]], str, list[tuple[str, bool]]]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@cache
def clean_vocab() -> list[int]:
    """Ids of the pieces that stand for text: not control tokens, not raw bytes, and whose
    text has no control characters (a span of them decodes to what it shows)."""
    tok = default_tokenizer()
    ids = []
    for i in range(tok.vocab_size):
        if i in tok.special_ids or i < 3:
            continue
        text = tok.decode([i])
        if text.strip() and all(c.isprintable() for c in text) and "\ufffd" not in text:
            ids.append(i)
    return ids


def vocab_span(r: random.Random, lo: int = 1, hi: int = 12) -> str:
    """The text of lo..hi random pieces from the whole vocabulary."""
    vocab = clean_vocab()
    return default_tokenizer().decode([r.choice(vocab) for _ in range(r.randint(lo, hi))]
                                      ).strip()


COPY_PROMPTS = ["Repeat exactly: {s}", "Copy this text: {s}", "Echo back the following, "
                "unchanged:\n{s}", "Say \"{s}\" and nothing else.", "Write this again:\n{s}"]


def copy(r: random.Random) -> Example:
    s = vocab_span(r, 1, 24)
    while not s:
        s = vocab_span(r, 1, 24)
    return _user(r.choice(COPY_PROMPTS).format(s=s)), s, [(vocab_span(r, 1, 24), True)]


def train_value(r: random.Random) -> str:
    v = load("train")
    kind = r.choice(["first", "last", "street", "city", "country", "job", "company", "domain",
                     "word", "number", "pseudo", "span"])
    if kind == "number":
        return str(r.randint(0, 10 ** r.randint(1, 7)))
    if kind == "pseudo":
        return shipped.pseudo_word(r)
    if kind == "span":
        return vocab_span(r, 1, 5) or "x"
    return r.choice(v[kind])


def train_key(r: random.Random) -> str:
    choice = r.random()
    if choice < 0.4:
        return r.choice(list(shipped.FIELDS))
    if choice < 0.8:
        return "_".join(r.choice(load("train")["word"]).lower().split())
    return "".join(c for c in vocab_span(r, 1, 2) if c.isalnum()).lower() or "key"


def json_object(r: random.Random) -> Example:
    keys: list[str] = []
    while len(keys) < r.randint(1, 8):
        key = train_key(r)
        keys += [] if key in keys else [key]
    values = {k: train_value(r) for k in keys}
    sep = r.choice([": ", ": ", ": ", " = ", " - ", ":"])
    lines = "\n".join(f"{k}{sep}{v}" for k, v in values.items())
    answer = json.dumps(values, ensure_ascii=False)
    wrong = dict(values)
    wrong[r.choice(keys)] = train_value(r)
    return (_user(json_instruction(r).format(lines=lines)), answer,
            [(json.dumps(wrong, ensure_ascii=False), True), (answer[:-1], True)])


# The source document's own example, word for word: the prompt the README's main job and the
# CLI's test run. It is trained on (the final stage, about one row in a hundred) so that the
# product's first example is exact; the held-out sets measure the skill on other values.
SOURCE_VALUES = {"name": "John", "lastname": "Smith", "address": "#1 Samuel St."}


def source_example() -> Example:
    lines = "\n".join(f"{k}: {v}" for k, v in SOURCE_VALUES.items())
    answer = json.dumps(SOURCE_VALUES)
    return (_user(shipped.JSON_PROMPTS[0].format(lines=lines)), answer,
            [(answer[:-1], True)])


NEWLINE = 13  # the piece <0x0A>


def _pieces(text: str) -> list[int]:
    """Ids of `text` as it tokenizes after a line break: no leading space added."""
    tok = default_tokenizer()
    ids = tok.encode("\n" + text, bos=False)
    return ids[ids.index(NEWLINE) + 1:]


def json_answer_ids(values: dict[str, str]) -> list[int] | None:
    """The ids of json.dumps(values) written as a copy of the prompt's lines (`key: value`)
    rather than as SentencePiece would cut the answer: each value keeps the pieces it has in
    the prompt, its first piece without its space (`\u2581Am` -> `Am`: a JSON string opens with
    `"`, not a space), so that the answer is a piece-by-piece copy the model can learn to make
    for any value, not one re-spelling per value. The tokenizer's own cut of `"Okafor"`, `O
    kaf or`, shares no first piece with the prompt's `\u2581Ok af or`, and no model can copy
    its way there. A value whose first piece has no twin (`\u2581Kevin`: the vocabulary has no
    `Kevin`) keeps the tokenizer's cut. None when JSON would escape a character."""
    tok = default_tokenizer()
    pieces, twins = tok.pieces(), tok.twins()
    ids = tok.encode('{"', bos=False)
    for n, (key, value) in enumerate(values.items()):
        if json.dumps(key, ensure_ascii=False) != f'"{key}"' or \
                json.dumps(value, ensure_ascii=False) != f'"{value}"':
            return None
        copied = tok.encode(value, bos=False)  # as in the prompt, after a space
        if copied and pieces[copied[0]] == "\u2581":  # the bare space, before a digit
            copied = copied[1:]
        elif copied and copied[0] in twins:
            copied = [twins[copied[0]], *copied[1:]]
        else:  # no twin: only a model that can spell `\u2581Kevin` writes `K evin`
            copied = _pieces(value)
        ids += ([] if n == 0 else _pieces('", "')) + _pieces(key) + _pieces('": "') + copied
    ids += _pieces('"}')
    if tok.decode(ids) != json.dumps(values, ensure_ascii=False):
        return None
    return ids


# (each has the key before a full stop: KEY_TAILS replaces the first)
KEY_LINES = ["The pass key is {key}. Remember it. {key} is the pass key.",
             "Remember this number: {key}.", "The magic number is {key}."]
QUESTIONS = ["What is the pass key?", "What number were you asked to remember?",
             "What is the magic number?"]
# what follows the key in half of the key lines, then a filler sentence: with a full stop after
# every training key, the model stopped after a copied key only where a "." followed it, and
# held-out notes that went on after the key ("... is 5597592; keep ...") had the copy run on
# (`5597592; 155`: 53 of 100 held-out keys, 90 of which were found)
KEY_TAILS = [",", ";", ":", " -", "!", " and", " so", " but", " which", " as"]
# the varied phrasings (from the numbers stage on): with the three above alone, runs/d20's final
# model found 7-digit keys at 128 tokens 37 times in 40 in their words, 27 in another frame's
# (none of these words is the held-out set's: no "code", "note", "secret" or "given")
KEY_NOUNS = ["pass key", "magic number", "PIN", "access number", "account number",
             "lucky number", "ticket number", "room number", "order number", "reference number",
             "serial number", "combination", "password", "locker number", "extension"]
VARIED_LINES = ["The {noun} is {key}.", "Remember this {noun}: {key}.", "My {noun} is {key}.",
                "Here is the {noun}: {key}.", "Please remember that the {noun} is {key}.",
                "Your {noun} will be {key}.", "For the record, the {noun} is {key}.",
                "The {noun} is {key}. Remember it. {key} is the {noun}.",
                "Do not forget the {noun}. It is {key}.", "They set the {noun} to {key}."]
VARIED_QUESTIONS = ["What is the {noun}?", "What was the {noun}?", "Tell me the {noun}.",
                    "What {noun} does the text mention?", "Find the {noun} in the text.",
                    "What number were you asked to remember?", "What is the hidden number?",
                    "Repeat the {noun}.", "What is the {noun} in the text above?"]
TASK_LINES = ["There is an important number hidden in the text below. Find it.",
              "Somewhere in this text is a number you will be asked for.",
              "The passage below contains one number that matters. Look for it.",
              "Find the number hidden in the following text.", "",
              "Below is a long text. Pay attention to any number in it."]


def passkey(r: random.Random, sentences: list[str], max_chars: int, long_keys: bool = False,
            max_tokens: int = 0, few_digits: bool = False, varied: bool = False) -> Example:
    """Filler sentences up to ~max_chars (~3.5 characters a token), the key line at a uniform
    depth; the question matches the key line's wording. Keys have 1-7 digits, or with
    long_keys 5-8 (the numbers stage drills copying them: the 6-7 digit keys that went wrong
    lost their place among repeated digits, 5597592 -> 5592). With max_tokens, the filler is
    measured in tokens instead, drawn up to 15 % past max_tokens and cut, a sentence at a time
    from the end, to a prompt of at most max_tokens: 27 % of the built final stage's rows
    reach 900 tokens and 18 % 990 (by characters alone, 1 in 22 reached 900, and held-out keys
    at 1,000 tokens were found 25-35 % of the time). With few_digits, half the (long) keys
    are drawn from 2-4 digits, so that nearly every digit repeats: a copy that goes by the last
    digit alone loses its place in them (7660653 -> 766053). With varied, the task, the key's
    line and the question are drawn from many phrasings (the key's name shared by line and
    question), not one of three fixed triples."""
    key = (str(r.randint(10 ** 4, 10 ** r.randint(5, 8) - 1)) if long_keys
           else str(r.randint(0, 10 ** r.randint(1, 7))))
    if few_digits and r.random() < 0.5:
        alphabet = r.sample("0123456789", r.randint(2, 4))
        key = r.choice([d for d in alphabet if d != "0"]) + "".join(
            r.choice(alphabet) for _ in range(r.randint(4, 7)))
    which = r.randrange(len(KEY_LINES))
    line, question = KEY_LINES[which].format(key=key), QUESTIONS[which]
    task = TASK_LINES[0]
    if varied:
        noun = r.choice(KEY_NOUNS)
        line = r.choice(VARIED_LINES).format(key=key, noun=noun)
        question, task = r.choice(VARIED_QUESTIONS).format(noun=noun), r.choice(TASK_LINES)
    if r.random() < 0.5:
        more = r.choice(sentences)
        line = line.replace(f"{key}.", f"{key}{r.choice(KEY_TAILS)} {more[:1].lower()}{more[1:]}",
                            1)
    filler: list[str] = []
    size = _tokens if max_tokens else (lambda s: len(s) + 1)  # a sentence's tokens or chars
    budget = r.randint(0, int(max_tokens * 1.15) if max_tokens else max_chars)
    while sum(map(size, filler)) < budget:
        filler.append(r.choice(sentences))
    at = r.randint(0, len(filler))  # the key line's place among the filler sentences

    def ask() -> list[dict[str, str]]:
        lines = [*filler[:at], line, *filler[at:]]
        return _user((task and task + "\n") + " ".join(lines) + "\n" + question)

    while max_tokens and len(chat.encode(ask())) > max_tokens:
        filler.pop()
        at = min(at, len(filler))
    return ask(), key, [(str(r.randint(0, 99999)), True)]


@cache
def _tokens(sentence: str) -> int:
    return len(default_tokenizer().encode(sentence, bos=False))


def digits(r: random.Random) -> tuple[int, int]:
    return r.randint(10, 99), r.randint(10, 99)


def arith_practice(r: random.Random) -> Example:
    a, b = digits(r)
    ones = a % 10 + b % 10
    tens = a // 10 + b // 10 + ones // 10
    steps = (f"Ones: {a % 10} + {b % 10} = {ones}, write {ones % 10}, carry {ones // 10}. "
             f"Tens: {a // 10} + {b // 10} + {ones // 10} = {tens}, write {tens}. "
             f"So {a} + {b} = {a + b}.")
    # the cue opens the request: "Add {a} and {b} digit by digit." began as a plain request
    # does, and sent held-out "Add 80 and 65." to these steps (recipes/curriculum/README.md)
    prompt = r.choice(["Digit by digit: {a} + {b}", "Step by step: {a} + {b}"])
    return _user(prompt.format(a=a, b=b)), steps, [(steps.replace(str(a + b), str(a + b + 10)),
                                                    True)]


def arith_plain(r: random.Random) -> Example:
    a, b = digits(r)
    prompt = r.choice(["What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?",
                       "How much is {a} + {b}?"])
    return _user(prompt.format(a=a, b=b)), str(a + b), [(str(a + b + r.choice([-10, -1, 1, 10])),
                                                         True)]


# the plain sum asked in words: the held-out sets' phrasings are other sentences
# (scripts/heldout/sets.py, OOD_ADD; a test checks that none is here). With "+" alone in
# training, a model that summed 78 % of held-out "+" questions right summed 18 % of the
# held-out questions in words.
WORD_SUMS = ["How much is {a} plus {b}?", "{a} plus {b} is what?", "Tell me {a} plus {b}.",
             "Find {a} plus {b}.", "Sum up {a} and {b}.", "Find the sum: {a} + {b}",
             "Give me the total of {a} and {b}.", "Put {a} and {b} together: how much is that?",
             "If I add {a} and {b}, what is the result?", "{a} and {b} added together?",
             "Work out {a} plus {b}.", "I have {a} and get {b} more. How many now?",
             "Increase {a} by {b}.", "Total of {a} + {b}?"]


def arith_words(r: random.Random) -> Example:
    a, b = digits(r)
    return _user(r.choice(WORD_SUMS).format(a=a, b=b)), str(a + b), [
        (str(a + b + r.choice([-10, -1, 1, 10])), True)]


def text(r: random.Random, passages: list[str]) -> str:
    """A passage of the corpus as a plain-text row ({"text": ...}): SFT trains on every token
    of it, as pretraining did, so that every fine-tuning stage keeps text modelling alive."""
    return r.choice(passages)


SEPARATORS = [" ", "\n", " | ", ", ", " ; ", "\n\n"]


def induction(r: random.Random, length: int = 64, vocab: int = 32000
              ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of length + 1 ids: [BOS, span, span, noise], a span of length/4 to
    length/2 - 1 pieces drawn uniformly from ids 3.. of the vocabulary, then random pieces to
    the end; labels are -100 (no loss) except on the repeat, the only part a model can predict."""
    n = r.randint(length // 4, length // 2 - 1)
    span = [r.randrange(3, vocab) for _ in range(n)]
    ids = [1, *span, *span] + [r.randrange(3, vocab) for _ in range(length - 2 * n)]
    return ids, [-100] * (n + 1) + span + [-100] * (length - 2 * n)


def repeats(r: random.Random, words: list[str], tokens: int = 240) -> str:
    """About `tokens` tokens of one span of 2-24 pieces (half the time corpus words, half
    pieces of the whole vocabulary) repeated with one separator. Spans are shown many times, so
    that most tokens reward a copy (32-piece spans shown twice taught a pilot nothing in 900
    steps), and their lengths vary, so that only a copy by content pays: a pilot trained on one
    fixed period learnt to copy by position and failed at another period."""
    tok = default_tokenizer()
    span = ""
    while not span:
        if words and r.random() < 0.5:
            span = " ".join(r.choice(words) for _ in range(r.randint(2, 16)))
        else:
            span = vocab_span(r, 2, 24)
    n = max(2, tokens // max(1, len(tok.encode(span, bos=False))))
    return r.choice(SEPARATORS).join([span] * n)
