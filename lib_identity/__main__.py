"""Command line: ``python -m lib_identity inspect PATH [--json]``, ``models`` and ``fields``."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import IdentityError


def _cmd_inspect(args) -> int:
    from . import formats

    info = formats.inspect(args.path)
    if args.json:
        print(json.dumps(info.to_json(), indent=2, sort_keys=True, default=str))
        return 0
    print(f"{args.path}")
    print(f"  family:        {info.family}")
    print(f"  variant:       {info.variant}")
    print(f"  base model:    {info.base or '-'}")
    print(f"  image encoder: {formats.describe_encoder(info.image_encoder) if info.image_encoder else '-'}")
    print(f"  encoder output:{' ' + info.encoder_output if info.encoder_output else ' -'}")
    print(f"  tokens:        {info.tokens if info.tokens is not None else '-'}")
    print(f"  projection:    {info.projection or '-'}")
    print(f"  LoRA:          {'rank ' + str(info.lora_rank) if info.lora else 'no'}")
    if info.face_model:
        print(f"  face model:    insightface {info.face_model}")
    print(f"  container:     {info.container}, {info.key_count} tensors, {', '.join(info.dtypes)}")
    for hint in info.hints:
        print(f"  note:          {hint}")
    return 0


def _cmd_models(args) -> int:
    from . import discovery

    entries = discovery.list_models(discovery.model_folders(extra=args.dir), refresh=True)
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2, default=str))
        return 0
    if not entries:
        print("no model files found in: " + ", ".join(discovery.model_folders(extra=args.dir)))
    for e in entries:
        what = e.info.summary() if e.info else "unusable: " + e.error
        print(f"{e.name} [{e.short_hash or '--------'}]  {what}")
    return 0


def _cmd_fields(args) -> int:
    from . import units

    if args.json:
        print(json.dumps(units.field_docs(), indent=2, default=str))
    else:
        print(units.field_table_markdown(), end="")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_identity", description="sd-webui-identity tools")
    parser.add_argument("--version", action="version", version=f"sd-webui-identity {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="say what a checkpoint file (or diffusers folder) is")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=_cmd_inspect)
    p = sub.add_parser("models", help="list the identity models found in the model folders")
    p.add_argument("--dir", action="append", default=[], help="an extra model folder (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_models)
    p = sub.add_parser("fields", help="every field of a unit (API, infotext, X/Y/Z), as README's Markdown table")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_fields)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except IdentityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
