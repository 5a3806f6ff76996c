"""``python -m job.data prepare``: validate a source and write its prepared store ahead of training
(e.g. in a Kubernetes data-preparation Job). Ends with one JSON line of counts and classes."""
from __future__ import annotations

import argparse
import json
import sys

from job.config import DataConfig
from job.data.errors import DataError
from job.data.store import SOURCES, prepare
from job.data.synthetic import MAX_SYNTHETIC_TEST, MAX_SYNTHETIC_TRAIN
from job.preemption import EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    defaults = DataConfig()  # one source of defaults: the training config's
    parser = argparse.ArgumentParser(prog="python -m job.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="validate a source and write the prepared store")
    p.add_argument("--source", choices=SOURCES, required=True)
    p.add_argument("--root", help="cifar10: cifar-10-batches-py dir or .tar.gz (download dir with "
                                  "--download); folder: dir with train/ and test/; synthetic: where "
                                  "to write the generated batches")
    p.add_argument("--out", required=True, help="directory of the prepared store (new, empty, or a store "
                                                "this job wrote; never inside --root)")
    p.add_argument("--download", action="store_true", help="cifar10: fetch the official tarball into --root")
    p.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                   help=f"fraction of train held out, stratified (default {defaults.val_fraction})")
    p.add_argument("--seed", type=int, default=defaults.split_seed,
                   help="seed of the validation split and synthetic data")
    p.add_argument("--num-train", type=int, default=defaults.synthetic_train,
                   help=f"synthetic: training images (at most {MAX_SYNTHETIC_TRAIN})")
    p.add_argument("--num-test", type=int, default=defaults.synthetic_test,
                   help=f"synthetic: test images (at most {MAX_SYNTHETIC_TEST})")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="folder: follow symlinks that lead outside --root (refused by default)")
    args = parser.parse_args(argv)
    try:
        data = DataConfig(source=args.source, root=args.root, download=args.download, val_fraction=args.val_fraction,
                          split_seed=args.seed, synthetic_train=args.num_train, synthetic_test=args.num_test,
                          follow_symlinks=args.follow_symlinks)
        store, reused = prepare(data, args.out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps({"store": str(store.path), "source": args.source, "reused": reused,
                      "counts": store.counts, "classes": store.classes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
