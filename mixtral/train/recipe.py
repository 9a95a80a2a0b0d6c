"""`mixtral train STAGE --config RECIPE [KEY=VALUE ...]`: a recipe (YAML) with the overrides
given after it, turned into a TrainConfig (train/config.py: each value brought to its
setting's type, or refused in one line) and run (train/run.py).

    python -m mixtral.train.recipe sft --config recipes/default/sft.yaml steps=200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mixtral.command import Arguments, standalone
from mixtral.train.config import TrainConfig, setting


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=["pretrain", "sft", "dpo"],
                   help="pretrain (load balancing), sft (answers only) or dpo (preference pairs)")
    p.add_argument("--config", required=True, help="a recipe (YAML), e.g. recipes/*.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override recipe settings, e.g. steps=200 lr=1e-3")
    p.set_defaults(run=run)


COMMANDS: dict[str, Arguments] = {"train": arguments}


def read_recipe(path: str, overrides: list[str]) -> dict[str, Any]:
    """The recipe's settings, each override (KEY=VALUE, VALUE read as YAML) on top; an
    override is checked against its setting's type at once, so its error names the command
    line rather than the recipe."""
    import yaml

    try:
        recipe = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: write KEY=VALUE")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            first = str(e).strip().splitlines()[0]
            raise ValueError(f"override {item[:200]!r}: not valid YAML ({first})") from None
        recipe[key] = setting(key, parsed, "command line")
    return recipe


def run(args: argparse.Namespace) -> int:
    from mixtral.train.run import train

    recipe = read_recipe(args.config, args.overrides)
    recipe["stage"] = args.stage
    # TrainingError (a bad setting, a diverged run, a refused checkpoint) is a ValueError:
    # the one handler in mixtral.command prints it in one line, exit status 2
    print(train(TrainConfig.from_dict(recipe, args.config)))
    return 0


if __name__ == "__main__":
    sys.exit(standalone("python -m mixtral.train.recipe", COMMANDS))
