"""`spatial-entropy attention`: pictures of a run's [CLS] attention, optionally beside another's."""

from __future__ import annotations

import argparse

from spatial_entropy.choices import DEVICES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "attention",
        help="draw a run's attention maps over some images as one PNG grid",
        description=(
            "Per image: the input, each head's last-block [CLS] attention as a heatmap, the "
            "patches holding --mass of the attention, and the object mask when the dataset has "
            "one. With --compare, the same images for a second run (e.g. baseline vs "
            "regularised) side by side."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `train`")
    parser.add_argument("--compare", metavar="OTHER_RUN_DIR", help="a second run to show beside")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--images", metavar="DIR", help="a folder of images (default: the first --count of --split)"
    )
    source.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument(
        "--masks",
        metavar="MASKDIR",
        help="object masks of the --images images, MASKDIR/<stem>.png (0 = background, "
        "non-zero = object): outlined beside the kept patches",
    )
    parser.add_argument(
        "--void-value",
        type=int,
        metavar="N",
        help="pixel value of --masks that marks ignored pixels (e.g. 255 for VOC-style borders)",
    )
    parser.add_argument(
        "--count", type=int, default=8, help="images to draw, from --split or --images (default: 8)"
    )
    parser.add_argument(
        "--mass", type=float, default=0.6, help="attention mass the masks keep (default: 0.6)"
    )
    parser.add_argument("--out", required=True, metavar="FILE.png", help="where to write the PNG")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `spatial-entropy --help` does not load torch and timm.
    from spatial_entropy.visualize import run_attention_figure, save_figure

    run_dirs = [args.run_dir] + ([args.compare] if args.compare else [])
    try:
        fig = run_attention_figure(
            run_dirs,
            images_dir=args.images,
            masks_dir=args.masks,
            split=args.split,
            count=args.count,
            mass=args.mass,
            device=args.device,
            void_value=args.void_value,
        )
        save_figure(fig, args.out)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"spatial-entropy attention: {exc}") from exc
    print(f"wrote {args.out}")
    return 0
