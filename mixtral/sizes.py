"""Sizes typed by people (--shard-size 5GB, --max-ram 16GiB): one parser, one set of units.

  KB MB GB TB      powers of 1000, as disks and the Hugging Face hub count (its 5GB shards)
  KiB MiB GiB TiB  powers of 1024
  K M G T          powers of 1024 too: a bare letter is how memory is counted (`free -g`, 16G)
  B, or no unit    bytes (a whole number)

Case does not matter, a space may stand between the number and its unit, and the number may
have a decimal part (2.5G). The module imports nothing heavy: the command line parses sizes
before it loads PyTorch.
"""

from __future__ import annotations

import re
from decimal import Decimal

_UNITS = {"": 1, "B": 1,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Z]*)")


def parse_size(text: str | int, what: str = "") -> int:
    """'5GB', '16GiB', '2.5G', '500 MB' or a number of bytes -> bytes. `what` names the value
    in the error (e.g. "--max-ram"), a ValueError of one line."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    match = _SIZE.fullmatch(text.strip().upper()) if isinstance(text, str) else None
    if match is None or match[2] not in _UNITS or (match[2] == "" and "." in match[1]):
        shown = repr(text) if len(repr(text)) <= 40 else repr(text)[:40] + "..."  # not megabytes
        raise ValueError(f"{what + ' ' if what else ''}{shown} is not a size; write e.g. 5GB "
                         "(5 x 10^9 bytes), 16GiB or 16G (16 x 2^30), 500MB, or a whole number "
                         "of bytes")
    return int(Decimal(match[1]) * _UNITS[match[2]])  # exact: 0.3GB is 300000000
