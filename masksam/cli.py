"""The ``masksam`` command: one subcommand per pipeline step, nnU-Net style.

Each step module in ``masksam.components`` (and ``masksam.pipelines``) defines
``register_cli(subparsers)`` for its verb; :data:`VERBS` lists them with their one-line help, so
``masksam --help`` answers at once and ``masksam VERB`` imports only that verb's module.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from typing import Sequence

from masksam import __version__
from masksam.errors import UserError

# Every verb, in the order a user runs them: the module that defines it (its ``register_cli``)
# and its one-line help. `masksam --help` is printed from this table alone, without importing a
# step module (they pull in torch, MLflow or kfp: seconds); tests/test_cli.py checks that each
# line equals the module's own help and that every module with a ``register_cli`` is listed.
VERBS: dict[str, tuple[str, str]] = {
    "data": ("masksam.components.data",
             "generate, import, validate and fingerprint raw datasets (nnU-Net v2 raw layout)"),
    "preprocess": ("masksam.components.preprocess",
                   "fingerprint, plan and preprocess a raw dataset (nnU-Net v2 style)"),
    "train": ("masksam.components.train",
              "train MaskSAM on a preprocessed dataset (training dir + MLflow run)"),
    "evaluate": ("masksam.components.evaluate",
                 "score predicted label maps against references (Dice, HD95, NSD)"),
    "baseline": ("masksam.components.baseline",
                 "train and evaluate nnU-Net v2 on the same split, as the reference for `masksam compare`"),
    "compare": ("masksam.components.compare",
                "paired comparison of two evaluations of the same cases (bootstrap CI, Wilcoxon)"),
    "predict": ("masksam.components.predict", "segment new scans (NIfTI/NRRD/MHA file or folder)"),
    "export": ("masksam.components.export", "export a trained model to ONNX (+FP16, +TensorRT) and verify it"),
    "register": ("masksam.components.register",
                 "log the exported model as an MLflow pyfunc, register it, set its alias"),
    "pull": ("masksam.components.pull",
             "download a registered model (e.g. models:/masksam@champion) and verify it"),
    "serve": ("masksam.components.serve",
              "serve a registered model over REST (MLflow's scoring server, with size limits)"),
    "deploy": ("masksam.components.deploy",
               "write a KServe InferenceService manifest serving a registered model"),
    "pipeline": ("masksam.pipelines.cli", "compile, run locally or submit the Kubeflow pipeline"),
}


def _module_of(verb: str | None) -> str | None:
    """The one module a verb needs, so `masksam train` does not import kfp nor `masksam data`
    torch; None when the verb is unknown."""
    entry = VERBS.get(verb or "")
    return entry[0] if entry else None


_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc):`~?([^`]+)`")


def plain(text: str | None) -> str | None:
    """Help text without reStructuredText markup (docstrings double as --help descriptions):
    ``code`` -> `code`, :func:`name` -> name, and no ``::`` literal-block markers."""
    if not text:
        return text
    text = _ROLE.sub(r"\1", text).replace("``", "`")
    return re.sub(r"::(\s*\n)", r":\1", text)


def _plain_help(parser: argparse.ArgumentParser) -> None:
    """Apply :func:`plain` to a parser's description and those of its subcommands, and the
    paragraph-keeping formatter."""
    parser.formatter_class = _Formatter
    parser.description = plain(parser.description)
    parser.epilog = plain(parser.epilog)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                choice.help = plain(choice.help)
            for sub in action.choices.values():
                _plain_help(sub)


class _Formatter(argparse.HelpFormatter):
    """A description written over several lines (a module docstring) keeps its paragraphs and
    indented examples, which argparse would re-wrap into one block; one-line descriptions and
    option help are wrapped as usual."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.strip().splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def build_parser(verb: str | None = None, complete: bool = False) -> argparse.ArgumentParser:
    """The ``masksam`` parser. With a known ``verb`` only that verb's module is imported and its
    parser is complete; otherwise every verb is listed from :data:`VERBS` without importing any
    (``complete``: every verb's module is imported and every parser is complete)."""
    parser = argparse.ArgumentParser(
        prog="masksam",
        description="MaskSAM: prompt-free SAM for 3D medical image segmentation. "
        "Run the steps in order (data, preprocess, train, export, evaluate, register), "
        "or all of them with `dvc repro`. `masksam VERB --help` explains each verb.",
    )
    parser.add_argument("--version", action="version", version=f"masksam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    only = _module_of(verb)
    for name, (module_name, short) in VERBS.items():
        if complete or (module_name == only and name == verb):
            importlib.import_module(module_name).register_cli(sub)
        elif name != verb:
            sub.add_parser(name, help=short, add_help=False)
    _plain_help(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(verb)
    args = parser.parse_args(argv)
    if getattr(args, "no_progress", False):
        # --no-progress silences every bar, not only masksam's: MLflow's artifact downloads and
        # uploads, and any other library's tqdm (tqdm reads TQDM_DISABLE since 4.66)
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        os.environ["TQDM_DISABLE"] = "1"
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
