"""The ``masksam data`` step: generate, import, validate and fingerprint raw datasets.

Sub-verbs: ``phantom`` (generated CT demo data), ``import`` (AMOS, Synapse/BTCV, ACDC, MSD or an
nnU-Net raw dataset into the nnU-Net raw layout), ``validate`` (check a raw dataset, collecting
every problem) and ``manifest`` (write or verify DIR/manifest.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from masksam.components.params import add_params_arguments, params_from_args, pick
from masksam.errors import UserError

IMPORT_FORMATS = ("nnunet", "msd", "amos", "synapse", "acdc")


def _run_phantom(args: argparse.Namespace) -> int:
    """Options given win, else params' data: section (whose defaults are components/params.py's)."""
    from masksam.components.data.phantom import generate_phantom

    p = params_from_args(args).data
    out = pick(args.out, p.out)
    generate_phantom(
        out, cases=pick(args.cases, p.cases), seed=pick(args.seed, p.seed), size_xyz=list(pick(args.size, p.size)),
        workers=int(args.workers), progress=not args.no_progress, force=bool(args.force),
    )
    print(f"phantom dataset written to {out}")
    return 0


def _run_import(args: argparse.Namespace) -> int:
    from masksam.components.data.importers import import_dataset

    params = params_from_args(args)
    p = params.data
    fmt = pick(args.format, p.source if p.source in IMPORT_FORMATS else None)
    src = pick(args.src, p.src)
    if fmt is None or src is None:
        raise UserError(f"import needs --format and SRC (or --params with data.source one of "
                        f"{', '.join(IMPORT_FORMATS)} and data.src; {params.source} has data.source "
                        f"{p.source!r}, data.src {p.src!r})")
    modality = pick(args.modality, p.modality if fmt == "amos" else None)
    subset = pick(args.subset, p.subset if fmt == "synapse" else None)
    report = import_dataset(fmt, src, pick(args.dst, p.out), modality=modality, subset=subset,
                            progress=not args.no_progress, force=bool(args.force))
    print(report)
    return 0


def _run_fetch(args: argparse.Namespace) -> int:
    """Make the raw dataset that params.yaml's data: section names: the phantom or an import."""
    source = params_from_args(args).data.source
    common = dict(params=args.params, set_overrides=args.set_overrides, no_progress=args.no_progress,
                  force=args.force)
    if source == "phantom":
        return _run_phantom(argparse.Namespace(out=None, cases=None, seed=None, size=None, workers=args.workers,
                                               **common))
    return _run_import(argparse.Namespace(format=None, src=None, dst=None, modality=None, subset=None, **common))


def _run_validate(args: argparse.Namespace) -> int:
    from masksam.components._io import atomic_path, check_output_file
    from masksam.components.data.validate import validate_dataset

    if args.report is not None:  # a wrong --report fails before the (long) validation
        check_output_file(args.report, inputs=(args.dir,), what="--report")
    report = validate_dataset(args.dir, strict=args.strict, read_pixels=not args.headers_only,
                              progress=not args.no_progress)
    text = report.format(max_cases=args.max_cases)
    print(text, file=sys.stdout if report.ok else sys.stderr)
    if args.report is not None and report.ok:
        with atomic_path(args.report, kind="file") as tmp:
            tmp.write_text(text + "\n")
    return 0 if report.ok else 1


def _run_manifest(args: argparse.Namespace) -> int:
    from masksam.components.data.manifest import verify_manifest, write_manifest

    if args.verify:
        diff = verify_manifest(args.dir, progress=not args.no_progress)
        print(diff.summary(), file=sys.stdout if diff.ok else sys.stderr)
        return 0 if diff.ok else 1
    manifest = write_manifest(args.dir, progress=not args.no_progress)
    print(f"{Path(args.dir) / 'manifest.json'}: {manifest['num_files']} files, "
          f"dataset sha256 {manifest['dataset_sha256']}")
    return 0


def register_cli(subparsers) -> None:
    """Add ``masksam data {phantom,import,fetch,validate,manifest}``."""
    data = subparsers.add_parser(
        "data", help="generate, import, validate and fingerprint raw datasets (nnU-Net v2 raw layout)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = data.add_subparsers(dest="data_verb", metavar="SUBVERB", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")

    def force(p: argparse.ArgumentParser) -> None:
        p.add_argument("--force", action="store_true",
                       help="replace the output folder even when it holds files masksam did not write")

    ph = sub.add_parser("phantom", help="write a generated abdominal CT dataset",
                        description="Write a generated abdominal CT-like dataset (HU images, 7 organ labels) "
                        "in the nnU-Net raw layout, plus manifest.json. Same seed, same arrays.")
    ph.add_argument("--out", help="output dataset folder (replaced whole if it is empty or an earlier "
                    "`masksam data` output)")
    ph.add_argument("--cases", type=int, help="number of cases (default 24)")
    ph.add_argument("--seed", type=int, help="random seed; case i uses default_rng([seed, i]) (default 0)")
    ph.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                    help="voxels per case (default 160 160 40: an infant-sized abdomen; 512 512 120: adult CT)")
    ph.add_argument("--workers", type=int, default=1, help="parallel processes, one case each (default 1)")
    add_params_arguments(ph, "read defaults from this params file's data: section (default: params.yaml "
                         "when present, else the built-in defaults)")
    force(ph)
    common(ph)
    ph.set_defaults(func=_run_phantom)

    im = sub.add_parser("import", help="convert a public dataset layout into the nnU-Net raw layout",
                        description="Convert AMOS 2022, Synapse/BTCV, ACDC, a Medical Segmentation Decathlon "
                        "task or an nnU-Net v2 raw dataset into the nnU-Net raw layout; the result is "
                        "validated and gets a manifest.json.")
    im.add_argument("--format", choices=IMPORT_FORMATS, help="layout of SRC")
    im.add_argument("src", nargs="?", metavar="SRC", help="folder of the public dataset as downloaded")
    im.add_argument("dst", nargs="?", metavar="DST", help="output dataset folder (new, empty or an earlier "
                    "`masksam data` output)")
    im.add_argument("--modality", choices=("ct", "mr", "all"),
                    help="amos only: CT cases (ids < 500, default), MR cases (>= 500) or all")
    im.add_argument("--subset", type=int, choices=(8,),
                    help="synapse only: keep the TransUNet 8 organs, relabelled 1..8")
    add_params_arguments(im, "read defaults from this params file's data: section (default: params.yaml "
                         "when present)")
    force(im)
    common(im)
    im.set_defaults(func=_run_import)

    va = sub.add_parser("validate", help="check a raw dataset, listing every problem",
                        description="Check dataset.json, every case's channels and label, readability, 3D, "
                        "matching geometry, declared label values, NaN/inf; print a case table and class "
                        "frequencies. Exits 1 if anything is wrong.")
    va.add_argument("dir", metavar="DIR", help="dataset folder holding dataset.json")
    va.add_argument("--strict", action="store_true", help="treat empty labels (background only) as errors")
    va.add_argument("--headers-only", action="store_true",
                    help="read image headers only (fast; skips truncation, label-value and NaN checks)")
    va.add_argument("--max-cases", type=int, default=None, help="rows of the case table to print (default all)")
    va.add_argument("--report", metavar="FILE", help="also write the report to FILE when the dataset is valid "
                    "(the DVC stage's output; an invalid dataset writes nothing and exits 1)")
    common(va)
    va.set_defaults(func=_run_validate)

    fe = sub.add_parser("fetch", help="make the raw dataset params.yaml's data: section names (dvc.yaml's stage)",
                        description="Generate the phantom (data.source: phantom) or import a public dataset "
                        "(data.source: nnunet|msd|amos|synapse|acdc, data.src: its folder) into data.out, as "
                        "params.yaml's data: section says. The same as calling `phantom` or `import` with "
                        "--params.")
    add_params_arguments(fe, "params file to read (default: %(default)s)", default="params.yaml")
    fe.add_argument("--workers", type=int, default=1, help="parallel processes for the phantom (default 1)")
    force(fe)
    common(fe)
    fe.set_defaults(func=_run_fetch)

    ma = sub.add_parser("manifest", help="write or verify DIR/manifest.json (sha256 per file)",
                        description="Write DIR/manifest.json (sha256, bytes, size and spacing per file, and a "
                        "dataset hash over them), or with --verify report files changed, missing or added.")
    ma.add_argument("dir", metavar="DIR", help="dataset folder")
    ma.add_argument("--verify", action="store_true", help="compare DIR with its manifest instead of writing it")
    common(ma)
    ma.set_defaults(func=_run_manifest)
