"""``python -m qktrace.organism {train,eval,report} ...``: train, evaluate, or re-report the organism.

python -m qktrace.organism train --out data/organism   # = python -m qktrace.organism.train
python -m qktrace.organism eval [--model DIR] [--n 200] # held-out accuracy per task and size
python -m qktrace.organism report [DIR]                 # accuracy + heads -> heads.json, CARD.md
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("train", "eval", "report"):
        print(__doc__)
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    if command == "train":
        from qktrace.organism.train import main as train_main

        train_main(rest)
    elif command == "eval":
        from qktrace.organism.evaluation import main as eval_main

        eval_main(rest)
    else:
        import torch

        from qktrace.organism.report import report

        torch.set_num_threads(2)
        report(rest[0] if rest else "data/organism")


if __name__ == "__main__":
    main(sys.argv[1:])
