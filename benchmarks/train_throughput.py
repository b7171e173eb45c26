"""Images/s of the project's training loop (data loading included) with no regulariser, spatial
entropy, DRLoc and both, against a bare loop over the same timm model on tensors in memory.

Arms run interleaved, one window of ``--steps`` optimiser steps each per repeat; medians are
taken over the repeats after ``--warmup`` windows. Prints a table, writes the raw numbers as JSON.

    python benchmarks/train_throughput.py --config configs/demo.yaml

The regularisers' lambdas are the config's (``se.weight`` or 0.01, ``drloc.weight`` or 0.1),
constant; ``drloc.pairs`` and ``drloc.hidden`` are the config's.

``--compile`` adds the regularised project loop under ``torch.compile`` (``compile: true``, the
config's ``compile_backend``); its first warm-up window holds the compilation, whose length
the JSON keeps (``warmup_seconds`` of every arm).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from spatial_entropy.config import TrainConfig, load_config
from spatial_entropy.distributed import init_distributed
from spatial_entropy.engine import build_datasets, build_training_run, train_one_epoch
from spatial_entropy.loader import build_train_loader
from spatial_entropy.models import create_model


class BareLoop:
    """Forward, cross-entropy, backward, AdamW step: the same model, one batch kept in memory."""

    def __init__(self, cfg: TrainConfig, train_set, device: torch.device) -> None:
        torch.manual_seed(cfg.seed)
        self.model = create_model(
            cfg.model, num_classes=train_set.num_classes, img_size=cfg.img_size,
            in_chans=train_set.in_chans, drop_path_rate=cfg.drop_path, **cfg.model_kwargs,
        ).to(device)  # fmt: skip
        self.optimizer = create_optimizer_v2(
            self.model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        items = [train_set[i] for i in range(cfg.batch_size)]
        self.images = torch.stack([image for image, *_ in items]).to(device)
        self.targets = torch.tensor([label for _, label, *_ in items], device=device)

    def __call__(self, steps: int) -> float:
        self.model.train()
        start = time.perf_counter()
        for _ in range(steps):
            loss = F.cross_entropy(self.model(self.images), self.targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        loss.item()  # wait for the device
        return steps * self.images.shape[0] / (time.perf_counter() - start)


class ProjectLoop:
    """``engine.train_one_epoch`` over the config's data loader, limited to a window of steps."""

    def __init__(self, cfg: TrainConfig, train_set, info) -> None:
        self.loader = build_train_loader(
            train_set, cfg.batch_size, info, seed=cfg.seed, num_workers=cfg.num_workers
        )
        self.run = build_training_run(
            cfg, info, train_set.num_classes, train_set.in_chans, len(self.loader)
        )
        self.epoch = 0

    def __call__(self, steps: int) -> float:
        if steps > self.run.steps_per_epoch:
            raise ValueError(f"--steps {steps} exceeds one epoch ({self.run.steps_per_epoch})")
        self.run.total_steps = self.run.step + steps
        epoch, self.epoch = self.epoch, self.epoch + 1
        self.loader.sampler.set_position(epoch)
        return train_one_epoch(self.run, self.loader, epoch)["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per arm")
    parser.add_argument("--warmup", type=int, default=1, help="untimed windows per arm")
    parser.add_argument("--compile", action="store_true", help="add a compiled arm")
    parser.add_argument("--output", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()

    quiet = [*args.overrides, "log_every=1000000"]  # the progress bar would sync every step
    cfg = load_config(args.config, quiet)
    info = init_distributed(cfg.device)
    train_set, _ = build_datasets(cfg, info)
    se_weight, drloc_weight = cfg.se.weight or 0.01, cfg.drloc.weight or 0.1
    # A constant lambda: under the warm-up schedule lambda is 0 at the start and the
    # regulariser would cost no backward at all.
    se_on, se_off = [f"se.weight={se_weight}", "se.schedule=constant"], ["se.weight=0"]
    drloc_on, drloc_off = [f"drloc.weight={drloc_weight}"], ["drloc.weight=0"]
    project_arms = {
        "regulariser off": se_off + drloc_off,
        f"SE (lambda={se_weight})": se_on + drloc_off,
        f"DRLoc (lambda={drloc_weight})": se_off + drloc_on,
        "SE + DRLoc": se_on + drloc_on,
    }
    arms = {"bare timm loop, in-memory batch": BareLoop(cfg, train_set, info.device)}
    for name, sets in project_arms.items():
        arm_cfg = load_config(args.config, [*quiet, *sets])
        arms[f"project loop, {name}"] = ProjectLoop(arm_cfg, train_set, info)
    if args.compile:
        arm_cfg = load_config(args.config, [*quiet, *se_on, *drloc_off, "compile=true"])
        name = f"project loop, SE (lambda={se_weight}), compiled ({arm_cfg.compile_backend})"
        arms[name] = ProjectLoop(arm_cfg, train_set, info)

    rates: dict[str, list[float]] = {name: [] for name in arms}
    warmup_seconds: dict[str, float] = dict.fromkeys(arms, 0.0)
    for repeat in range(args.warmup + args.repeats):
        for name, arm in arms.items():
            start = time.perf_counter()
            rate = arm(args.steps)
            if repeat >= args.warmup:
                rates[name].append(rate)
            else:
                warmup_seconds[name] += time.perf_counter() - start

    bare = statistics.median(next(iter(rates.values())))
    rows = {name: {"median_images_per_s": statistics.median(r), "images_per_s": r,
                   "warmup_seconds": warmup_seconds[name]}
            for name, r in rates.items()}  # fmt: skip
    for row in rows.values():
        row["ratio_to_bare"] = row["median_images_per_s"] / bare
    print(f"\n{'arm':<62} {'images/s (median)':>18} {'vs bare':>8} {'warm-up s':>10}")
    for name, row in rows.items():
        print(f"{name:<62} {row['median_images_per_s']:>18.1f} {row['ratio_to_bare']:>8.3f} "
              f"{row['warmup_seconds']:>10.1f}")  # fmt: skip

    result = {
        "config": args.config, "overrides": args.overrides, "model": cfg.model,
        "dataset": cfg.dataset, "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
        "steps_per_window": args.steps, "repeats": args.repeats, "warmup": args.warmup,
        "drloc_pairs": cfg.drloc.pairs, "drloc_hidden": cfg.drloc.hidden,
        "device": str(info.device), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(), "arms": rows,
    }  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
