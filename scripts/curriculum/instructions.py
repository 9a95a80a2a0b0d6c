"""The JSON task's instructions, built from parts rather than drawn from a handful of fixed
sentences, so that a model learns what the instruction is not: a field.

With seven fixed templates (the instruction before the lines in six, `As JSON:` after them in
one), runs/d24b's final model parsed 27 of 100 held-out JSON/ood answers as JSON at all: given
an instruction it had never seen after the lines ("... Write it as ... and nothing else."), it
wrote that sentence into the object as one more key, or copied it on until the length limit.
Here an instruction is an ask before the lines, after them or both, in many words, with or
without a preamble, extra demands and a blank line; the separators between key and value stay
json_object's. The shipped generator's four templates (scripts/build_instruct_data.py) are
kept for half the rows: they are the source document's prompt and the in-distribution sets'.

No phrasing here shares three words in a row with the held-out generator's instructions
(scripts/heldout/sets.py, OOD_JSON_PROMPTS) outside the task's name (the runs with "JSON" in
them): a test checks it.
"""

from __future__ import annotations

import random

import build_instruct_data as shipped

# asks that read before the lines, each ended with ":" or "." by the generator
BEFORE = [
    "Turn these fields into a JSON object", "Convert to JSON", "Make a JSON object out of this",
    "Put this in JSON", "Encode these pairs as JSON", "Rewrite this list as JSON",
    "Change the lines below into a JSON object", "Output a JSON object for these entries",
    "Render the data below in JSON", "Give me JSON for the following key/value pairs",
    "Build one JSON object from this list", "Transform the pairs below into JSON",
    "Show these details as JSON", "Serialize this to JSON", "Create JSON from the entries below",
    "Map each line to a key in a JSON object", "JSON, from this", "Express the list in JSON",
    "Convert each key and its value into a JSON object",
    "Generate a valid JSON object from the following information",
]
# asks that read after the lines (they point back at them)
AFTER = [
    "As JSON:", "Convert the lines above to JSON.", "Now put all of that in JSON.",
    "Turn the list above into a JSON object.", "Give that to me in JSON.",
    "Encode those pairs as JSON.", "Write the entries above out as JSON.",
    "Make this into a JSON object.", "Output the pairs above as one JSON object.",
    "Those are the fields; the JSON object is what I want.", "Rewrite all of it in JSON.",
    "Serialize the lines above to JSON.", "What is that as a JSON object?",
    "Can you convert these to JSON?", "Show me the JSON.",
]
PREAMBLES = [
    "You are a helpful code assistant.", "Some data:", "The details:", "Information:",
    "Below are some entries.", "Look at this list.", "Data follows.", "I have these pairs.",
    "A customer filled in a form.", "From a spreadsheet row:", "My notes:",
    "The fields are listed one per line.",
]
DEMANDS = [
    "Only output JSON.", "No explanation.", "Do not add anything.", "Keep the keys as they are.",
    "Copy the values character for character.", "Answer with the object only.",
    "Use double quotes.", "Do not change any value.", "Just the JSON.", "Skip the commentary.",
    "One object, no prose.", "Leave the values unchanged.", "Keys stay in the same order.",
]


def json_instruction(r: random.Random) -> str:
    """A template with one `{lines}`: the shipped four half the time, else one built here."""
    if r.random() < 0.5:
        return r.choice(shipped.JSON_PROMPTS)
    gap = "\n\n" if r.random() < 0.25 else "\n"
    demands = " ".join(r.sample(DEMANDS, r.choice([0, 0, 1, 1, 2])))
    preamble = r.choice(PREAMBLES) + " " if r.random() < 0.25 else ""
    where = r.random()
    if where < 0.5:  # the ask first, the demands after it or after the lines
        ask = preamble + r.choice(BEFORE) + r.choice([":", ":", "."])
        if demands and r.random() < 0.5:
            return f"{ask} {demands}{gap}{{lines}}"
        return f"{ask}{gap}{{lines}}" + (f"\n{demands}" if demands else "")
    if where < 0.85:  # the lines first (after a preamble, if any)
        head = f"{preamble.strip()}\n" if preamble else ""
        return f"{head}{{lines}}{gap}{r.choice(AFTER)}" + (f" {demands}" if demands else "")
    # asked twice: before and after
    return (f"{preamble}{r.choice(BEFORE)}:\n{{lines}}{gap}{r.choice(AFTER)}"
            + (f" {demands}" if demands else ""))
