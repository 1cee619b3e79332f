"""``python -m lib_identity profile build|list|delete``: identity profiles from a shell.

The folders are found as the ``models`` and ``faces`` commands find them: ``--models`` is the
WebUI's models folder (adapters in its subfolders, face packs in ``insightface/models``, profiles
in ``identity/profiles``), ``--dir`` adds folders holding models or packs. The profile is built by
the same ``profiles.build`` the WebUI's route and button run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from .errors import IdentityError


def add_parser(sub) -> None:
    """Add ``profile`` with its three subcommands to the main parser's ``sub``."""
    p = sub.add_parser("profile", help="build, list or delete identity profiles (models/identity/profiles)")
    verbs = p.add_subparsers(dest="verb", required=True)
    b = verbs.add_parser("build", help="build a profile from 1 to 50 pictures and save it")
    b.add_argument("name", help="the profile's name (letters, digits, spaces and _ - . ( ) +)")
    b.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or WebP files of the person")
    _folders(b)
    b.add_argument("--face", default="largest", help="which face of each picture: largest (default) or its index")
    b.add_argument("--overwrite", action="store_true", help="replace a profile of the same name")
    b.add_argument("--json", action="store_true", help="print one JSON object: profile, messages, path")
    b.set_defaults(fn=_build)
    ls = verbs.add_parser("list", help="list the saved profiles")
    _folders(ls, dirs=False)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=_list)
    d = verbs.add_parser("delete", help="delete a saved profile")
    d.add_argument("name")
    _folders(d, dirs=False)
    d.set_defaults(fn=_delete)


def _folders(p, dirs: bool = True) -> None:
    p.add_argument("--models", default="models",
                   help="the WebUI's models folder (default: ./models); profiles are in <models>/identity/profiles")
    if dirs:
        p.add_argument("--dir", action="append", default=[], help="an extra folder holding models or face packs (repeatable)")


def profile_folder(models: str) -> str:
    """``<models>/identity/profiles``, where the WebUI keeps profiles too."""
    from . import profiles

    return os.path.join(models, profiles.PROFILE_SUBFOLDER)


def encoder_finder(models: str, dirs):
    """``find_encoder(need)`` for ``profiles.build``: a CLIP encoder in the model folders, a face pack
    in the pack folders; the path, or an ``IdentityError`` saying what is missing and where it was looked for."""
    from . import discovery
    from .encoders import find_encoder
    from .encoders import faces

    model_folders = discovery.model_folders(models, extra=dirs)
    pack_folders = faces.search_folders(models, extra_dirs=dirs)

    def find(need: str):
        if need.startswith("clip-"):
            return find_encoder(need, model_folders)
        if need.startswith("insightface:"):
            return faces.find_pack(need.split(":", 1)[1], pack_folders)
        raise IdentityError(f"{need} is not used to build a profile")

    return find


def _read_picture(path: str):
    from .image_input import ImageInputError, image_from_bytes

    try:
        with open(path, "rb") as fh:
            return image_from_bytes(fh.read())
    except OSError as e:
        raise IdentityError(f"{path}: {e.strerror or e}") from None
    except ImageInputError as e:
        raise IdentityError(f"{path}: {e}") from None


def _build(args) -> int:
    from . import discovery, profiles
    from .units import SPECS
    from .units.parsers import API, Context, Invalid

    name = profiles.check_name(args.name)
    folder = profile_folder(args.models)
    if not args.overwrite and os.path.isfile(profiles.profile_path(folder, name)):
        raise profiles.ProfileExistsError(f"a profile named '{name}' exists already in {folder}: choose another name, "
                                          "or add --overwrite, or delete it first (profile delete)")
    if len(args.images) > profiles.MAX_PICTURES:
        raise profiles.ProfileError(f"{len(args.images)} pictures; a profile is built from at most {profiles.MAX_PICTURES}")
    try:
        face = SPECS["face"].parse(args.face, Context(API))
    except Invalid as e:
        raise IdentityError(f"--face: {e.message}") from None
    pictures = [_read_picture(path) for path in args.images]
    models = discovery.list_models(discovery.model_folders(args.models, extra=args.dir), refresh=True)
    # with --json, stdout is the one JSON object: progress and the encoders' console lines go to stderr
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = profiles.build(name, pictures, models=models, find_encoder=encoder_finder(args.models, args.dir),
                                face=face)
        path = profiles.save_profile(result.profile, folder, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"profile": result.profile.summary(), "messages": result.messages, "path": path}, indent=2))
        return 0
    for line in result.messages:
        print(line)
    print(f"saved {path}")
    return 0


def _list(args) -> int:
    from . import profiles

    folder = profile_folder(args.models)
    found = profiles.list_profiles(folder)
    if args.json:
        print(json.dumps({"folder": folder, "profiles": found}, indent=2, default=str))
        return 0
    if not found:
        print(f"no profiles in {folder}")
    for p in found:
        if "error" in p:
            print(f"{p['name']}  unreadable: {p['error']}")
            continue
        holds = ", ".join(p.get("packs", []) + p.get("encoders", []) + p.get("photomaker", [])) or "-"
        print(f"{p['name']}  {p['pictures']} picture(s), {len(p.get('left_out', []))} left out  holds: {holds}  "
              f"created {p.get('created')}")
    return 0


def _delete(args) -> int:
    from . import profiles

    profiles.delete_profile(profile_folder(args.models), args.name)
    print(f"deleted profile '{args.name}'")
    return 0
