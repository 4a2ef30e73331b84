#!/usr/bin/env python3
"""lsrm: the one command-line entry point.

    python lsrm.py params --config llama-7b [--json]     trainable / total parameters, by group
"""
from __future__ import annotations

import argparse
import json
import sys

from model import config as C
from model.vlm import build, param_groups


class UserError(Exception):
    """Bad input from the user: printed as one line, no traceback."""


def load_config(name: str, overrides: list[str] | None = None) -> C.Config:
    try:
        return C.apply_overrides(C.get_config(name), overrides or [])
    except KeyError as e:
        raise UserError(e.args[0]) from None
    except ValueError as e:
        raise UserError(str(e)) from None


def cmd_params(args) -> None:
    cfg = load_config(args.config, args.set)
    groups = param_groups(build(cfg, device="meta"))       # meta: no memory, no weights
    trainable = sum(g["trainable"] for g in groups.values())
    total = sum(g["total"] for g in groups.values())
    if args.json:
        print(json.dumps({"config": cfg.name, "trainable": trainable, "total": total, "groups": groups}))
        return
    print(f"{cfg.name}: {trainable / 1e6:.2f}M trainable of {total / 1e6:,.1f}M total "
          f"({trainable:,} / {total:,})")
    for name, g in groups.items():
        print(f"  {name:24s} {g['trainable']:>13,} trainable {g['total']:>15,} total")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lsrm.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="count trainable and total parameters (built on the meta device)")
    p.add_argument("--config", default="tiny", help=f"one of: {', '.join(C.PRESETS)}")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. lsrm.delta=0.2")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_params)

    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
