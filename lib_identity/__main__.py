"""Command line: ``python -m lib_identity inspect PATH [--json]``, ``... models``, ``... faces IMAGE``,
``... fields`` and ``... profile build|list|delete`` (``cli_profiles``)."""

from __future__ import annotations

import argparse
import contextlib
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


def _cmd_faces(args) -> int:
    from .encoders import faces
    from .image_input import ImageInputError, image_from_bytes

    try:
        with open(args.image, "rb") as fh:
            picture = image_from_bytes(fh.read())
    except OSError as e:
        print(f"error: {args.image}: {e.strerror or e}", file=sys.stderr)
        return 2
    except ImageInputError as e:
        print(f"error: {args.image}: {e}", file=sys.stderr)
        return 2
    folders = faces.search_folders(args.models, extra_dirs=args.dir)
    # with --json, stdout is the one JSON object: the analysis' console line (which runtime) goes to stderr
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        pack = faces.open_pack(args.pack, folders)
        found = faces.analyse_faces(picture, pack, det_size=args.det_size)
    if args.preview:
        faces.draw_faces(picture, found).save(args.preview)
    if args.json:
        out = {"image": args.image, "pack": pack.folder, "size": list(picture.size),
               "faces": [dict(index=i, **f.to_json()) for i, f in enumerate(found)]}
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.image} ({picture.width}x{picture.height}), pack {pack.folder}")
    if not found:
        print("  no face found")
    for i, f in enumerate(found):
        x0, y0, x1, y1 = f.box
        print(f"  {i}: box [{x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}]  {x1 - x0:.0f}x{y1 - y0:.0f}  score {f.score:.3f}")
    if args.preview:
        print(f"  preview: {args.preview}")
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
    p = sub.add_parser("faces", help="list the faces insightface finds in a picture (index, box, score)")
    p.add_argument("image")
    p.add_argument("--pack", default="buffalo_l", help="a pack name (searched) or a pack folder (default: buffalo_l)")
    p.add_argument("--models", help="the WebUI's models folder (packs in <models>/insightface/models/<pack>)")
    p.add_argument("--dir", action="append", default=[], help="an extra folder holding packs (repeatable)")
    p.add_argument("--det-size", type=int, default=640, help="detection size (default 640; smaller sizes are tried when nothing is found)")
    p.add_argument("--preview", help="write the picture with numbered boxes to this PNG file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_faces)
    from . import cli_profiles

    cli_profiles.add_parser(sub)
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
