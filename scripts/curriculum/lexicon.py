"""Verbs of harm and of kindness from WordNet's tree, for the safe prompt's pairs (`safety.acts`).

The hand-written pairs of `safety.harm` name 46 acts; a 2-layer model knows harm only from the
words it was shown, and held-out requests use others (recipes/curriculum/README.md: at best 55
of 80 right under the safe prompt). WordNet 3.0 (the corpus's `definitions.jsonl`, which keeps
each synset's hypernyms and a verb's sentence frames) names hundreds: every verb below a root
here (kill, injure, assault, cheat, steal, ruin, ... ; help, comfort, praise, repair, ...) is a
kind of it. The roots were chosen from WordNet's own glosses, not from the held-out requests.

A word joins a side when at least half of its verb senses lie under that side's roots (so
"draw", "fire" or "pick", which are mostly harmless, stay out of the harmful side), none lies
under the other side's, and one of those senses takes the object the frame gives it: a person
(WordNet's frame 9, "Somebody ----s somebody") or a thing (frame 8).

The lists are kept in `acts.json` beside this file (so the curriculum is built the same
without a corpus, and a test can check them against the held-out requests); rebuild them with

    python scripts/curriculum/lexicon.py data/corpus/definitions.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

ACTS = Path(__file__).with_name("acts.json")  # the lists as built from WordNet 3.0 (`main`)

# root synsets (WordNet 3.0 offsets) and their glosses
HARM_PEOPLE = {"01323976-v": "kill: cause to die", "00069879-v": "injure: cause bodily harm to",
               "01793195-v": "hurt the feelings of", "01120087-v": "assault someone physically",
               "00862701-v": "attack in speech or writing",
               "02573275-v": "cheat: deprive somebody of something by deceit",
               "00071178-v": "torture", "01802707-v": "torment", "00088339-v": "poison",
               "00871423-v": "threaten", "00845317-v": "use abusive language towards",
               "02516594-v": "mistreat", "01799812-v": "humiliate", "00848438-v": "insult",
               "00854438-v": "deceive", "02575082-v": "be dishonest with",
               "00064643-v": "give trouble or pain to"}
HARM_THINGS = {"02321775-v": "steal", "01564162-v": "destroy, ruin",
               "01619947-v": "cause the destruction of", "02321409-v": "rob"}
KIND_PEOPLE = {"00082081-v": "help: improve the condition of", "02547586-v": "help, assist",
               "00856842-v": "praise", "01814833-v": "comfort, console",
               "00892333-v": "thank", "01424474-v": "hug", "00829125-v": "teach",
               "01178583-v": "feed: give food to", "00081725-v": "heal, cure",
               "01818253-v": "encourage", "00881679-v": "compliment",
               "00882016-v": "congratulate", "01128211-v": "protect",
               "02487573-v": "visit: pay a brief visit", "02619424-v": "stay with as a guest"}
KIND_THINGS = {"00260648-v": "repair, mend", "01532607-v": "clean", "01128211-v": "protect"}
# under the roots, but not words for this data: sexual violence; slang whose other senses are
# ordinary; and words whose act is not the root's in plain use (a harm that is only leaving
# something out, feeding too little or too much, flattery, preaching; obscure trade words)
LEFT_OUT = {"rape", "gang-rape", "ravish", "molest", "screw", "jockey", "roll", "cook", "job",
            "sell", "kid", "cod", "snow", "fox", "step", "offer", "set", "rush", "round", "slang",
            "shout", "whip", "beat", "short", "pip", "turn", "pull", "jam", "hock", "invalid",
            "off", "con", "cop", "stone", "overlay", "overlie", "humble", "mar", "outrage",
            "except", "omit", "elide", "prune", "decouple", "disassemble", "dismantle",
            "interdict", "cremate", "cabbage", "glom", "snarf", "snitch", "pocket", "pirate",
            "harry", "rase", "destruct", "dilapidate", "brainwash", "indoctrinate", "malnourish",
            "undernourish", "overfeed", "overprotect", "flatter", "blandish", "lactate",
            "breastfeed", "suckle", "bottlefeed", "sonnet", "crusade", "evangelise",
            "evangelize", "canonise", "canonize", "catechise", "catechize", "ensky", "benefact",
            "patronage", "reinsure", "coinsure", "valet", "adulate", "lenify", "still", "quiet",
            "bootstrap", "revolutionise", "gruntle", "breakfast", "lunch", "dine", "bosom",
            "mother", "retrain", "exhort", "antisepticize", "autoclave", "bream", "bushel",
            "circumvallate", "coapt", "conglutinate", "tampon", "stopple", "stopper", "suds",
            "reheel", "resole", "sole", "repoint", "stockade", "palisade", "wall", "cork",
            "mothproof", "hygienise", "hygienize", "tranquilize", "tranquillise", "tranquillize",
            "placate", "pacify", "lull", "guard", "ward", "shepherd"}


# the roots' own words: polysemous ("kill the engine", "help yourself"), so the half rule
# leaves them out, but a request to do them to a person or a thing means the root
HEADS = {"harm_people": ["attack", "cheat", "hurt", "injure", "kill", "poison", "threaten",
                         "torture"],
         "harm_things": ["destroy", "ruin", "steal"],
         "kind_people": ["encourage", "feed", "heal", "help", "visit"],
         "kind_things": ["clean", "fix", "mend", "repair", "wash"]}


@dataclass
class Lexicon:
    harm_people: list[str]
    harm_things: list[str]
    kind_people: list[str]
    kind_things: list[str]


def load(definitions: Path) -> Lexicon:
    """The four word lists from a corpus's `definitions.jsonl` (sorted, so the same file gives
    the same lists)."""
    children: defaultdict[str, set[str]] = defaultdict(set)
    senses: defaultdict[str, list[str]] = defaultdict(list)  # verb -> its synsets
    frames: dict[str, set[int]] = {}
    with open(definitions) as f:
        for line in f:
            row = json.loads(line)
            if row["pos"] != "verb":
                continue
            for up in row.get("hypernyms", []):
                children[up].add(row["synset"])
            senses[row["word"]].append(row["synset"])
            frames[row["synset"]] = set(row.get("frames", []))
    if not frames or not children:
        raise ValueError(f"{definitions}: no verbs with hypernyms (built before WordNet's tree "
                         "was kept? rebuild the corpus with scripts/build_corpus.py)")

    def below(roots: dict[str, str]) -> set[str]:
        seen, todo = set(roots), list(roots)
        while todo:
            for child in children[todo.pop()] - seen:
                seen.add(child)
                todo.append(child)
        return seen

    harm, kind = below(HARM_PEOPLE | HARM_THINGS), below(KIND_PEOPLE | KIND_THINGS)

    def side(roots: dict[str, str], other: set[str], frame: int) -> list[str]:
        tree = below(roots)
        words = []
        for word, synsets in senses.items():
            inside = [s for s in synsets if s in tree]
            if (word.isalpha() and word.islower() and word not in LEFT_OUT
                    and 2 * len(inside) >= len(synsets) and not set(synsets) & other
                    and any(frame in frames[s] for s in inside)):
                words.append(word)
        return words

    lists = {"harm_people": side(HARM_PEOPLE, kind, 9), "harm_things": side(HARM_THINGS, kind, 8),
             "kind_people": side(KIND_PEOPLE, harm, 9), "kind_things": side(KIND_THINGS, harm, 8)}
    return Lexicon(**{name: sorted(set(words) | set(HEADS[name]))
                      for name, words in lists.items()})


def read(path: Path = ACTS) -> Lexicon:
    """The lists as `main` wrote them."""
    return Lexicon(**json.loads(path.read_text()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("definitions", type=Path, help="a corpus's definitions.jsonl")
    p.add_argument("--out", type=Path, default=ACTS)
    a = p.parse_args()
    try:
        words = load(a.definitions)
    except (OSError, ValueError, KeyError) as exc:  # missing, unreadable or not the corpus's
        p.error(f"{a.definitions}: {exc}")
    a.out.write_text(json.dumps(asdict(words), indent=1) + "\n")
    print(f"{a.out}: " + ", ".join(f"{k} {len(v)}" for k, v in asdict(words).items()))


if __name__ == "__main__":
    main()
