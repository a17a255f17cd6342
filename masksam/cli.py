"""The ``masksam`` command: one subcommand per pipeline step, nnU-Net style.

Each step module in ``masksam.components`` (and ``masksam.pipelines``) that defines
``register_cli(subparsers)`` contributes its verb(s); this file only collects them, so adding a
step never means editing a central table.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import pkgutil
import sys
from typing import Sequence

from masksam import __version__
from masksam.errors import UserError

# The order verbs appear in `masksam --help`: the order a user runs them.
_VERB_ORDER = [
    "data", "preprocess", "train", "evaluate", "predict", "export", "register", "pull", "serve", "pipeline",
]


# A verb lives in the module of the same name; these are the exceptions.
_VERB_MODULES = {"pipeline": "masksam.pipelines.cli"}


def _module_of(verb: str | None) -> str | None:
    """The one module a verb needs, so `masksam train` does not import kfp nor `masksam data`
    torch; None when the verb is unknown (then every module is loaded to list them all)."""
    if verb is None or not verb.isidentifier():
        return _VERB_MODULES.get(verb or "")
    if verb in _VERB_MODULES:
        return _VERB_MODULES[verb]
    name = f"masksam.components.{verb}"
    return name if importlib.util.find_spec(name) is not None else None


def _step_modules() -> list[str]:
    names = []
    for pkg_name in ("masksam.components", "masksam.pipelines"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                names.append(f"{pkg_name}.{info.name}")
    return names


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The ``masksam`` parser; with ``verb`` known, only that verb's module is imported."""
    parser = argparse.ArgumentParser(
        prog="masksam",
        description="MaskSAM: prompt-free SAM for 3D medical image segmentation. "
        "Run the steps in order (data, preprocess, train, evaluate, export, register), "
        "or all of them with `dvc repro`.",
    )
    parser.add_argument("--version", action="version", version=f"masksam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    only = _module_of(verb)
    for name in [only] if only else _step_modules():
        module = importlib.import_module(name)
        register = getattr(module, "register_cli", None)
        if register is not None:
            register(sub)
    # argparse lists choices in insertion order; put them in the order a user runs them.
    actions = sub._choices_actions
    actions.sort(key=lambda a: _VERB_ORDER.index(a.dest) if a.dest in _VERB_ORDER else 99)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(verb)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.func(args)
    except UserError as exc:
        print(f"masksam {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"masksam {args.verb}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
