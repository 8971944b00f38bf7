"""`normbench probe`: measure on a worker which batch sizes each variant affords (POST /v1/probes), wait, and
print step time, images/s and memory per variant × batch size, with what `--batch-sizes auto` resolves to."""

from __future__ import annotations

import argparse
import time
from typing import Any

from app.cli import Api, CliError, err, variants_arg
from app.core.units import human_bytes


def probe_body(args: argparse.Namespace) -> dict[str, Any]:
    model: dict[str, Any] = {"arch": args.arch}
    if args.width is not None:
        model["width"] = args.width
    body: dict[str, Any] = {
        "dataset_id": args.dataset,
        "model": model,
        "variants": args.variants,
        "max_batch_size": args.max_batch_size,
    }
    feed = {k: v for k, v in (("resize", args.resize), ("crop", args.crop)) if v is not None}
    if feed:
        body["input"] = feed
    if args.pack_size is not None:
        body["pack_size"] = args.pack_size
    return body


def probe_table(probe: dict[str, Any]) -> str:
    res = probe["result"]
    lines = [
        f"probe {probe['id']} on {res['device']} ({res['threads']} threads); memory: {res['memory_method']}, limit "
        f"{human_bytes(res['memory_limit_bytes'])} ({res['memory_limit_source']}) less {res['memory_margin']:.0%}, "
        f"{res['pack_size']} runs per pack, worker resident {human_bytes(res['resident_bytes'])}",
        f"{'variant':<16}{'batch':>7}{'step s':>10}{'images/s':>11}{'run memory':>13}{'pack needs':>13}  fits",
    ]
    for m in res["measurements"]:
        step = "—" if m["step_s"] is None else f"{m['step_s']:.4f}"
        ips = "—" if m["images_per_s"] is None else f"{m['images_per_s']:.1f}"
        run = "—" if m["run_bytes"] is None else human_bytes(m["run_bytes"])
        need = "—" if m["need_bytes"] is None else human_bytes(m["need_bytes"])
        fits = "yes" if m["fits"] else f"no{': ' + m['error'] if m['error'] else ''}"
        lines.append(f"{m['variant']:<16}{m['batch_size']:>7}{step:>10}{ips:>11}{run:>13}{need:>13}  {fits}")
    sizes = ",".join(map(str, res["auto_batch_sizes"])) or "none"
    lines.append(f"largest batch that fits every variant: {res['affordable_batch_size']}; --batch-sizes auto → {sizes}")
    if res["skipped"]:
        lines.append(f"skipped (time limit): {', '.join(res['skipped'])}")
    return "\n".join(lines)


def cmd_probe(api: Api, args: argparse.Namespace) -> int:
    probe = api.json("POST", "/v1/probes", json=probe_body(args))
    err(f"submitted probe {probe['id']} on {args.dataset}")
    if args.no_wait:
        print(probe["id"])
        return 0
    while probe["status"] in ("queued", "running"):
        time.sleep(args.poll_interval)
        probe = api.json("GET", f"/v1/probes/{probe['id']}")
    if probe["status"] != "succeeded":
        raise CliError(f"probe {probe['id']} {probe['status']}: {probe['error']}")
    print(probe_table(probe))
    return 0


def add_probe_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    probe = sub.add_parser(
        "probe",
        parents=[common],
        help="measure the batch sizes each variant affords on a worker (then submit --batch-sizes auto)",
        description="A worker trains each variant for a few steps at batch sizes 2, 4, 8, ... and measures step "
        "time and peak memory on its own device; prints the table and the batch sizes `submit --batch-sizes auto` "
        "will use.",
    )
    probe.add_argument("dataset", metavar="DATASET", help="a dataset id (upload files with `datasets upload`)")
    probe.add_argument("--variants", type=variants_arg, required=True, help="e.g. bn,gn:32,bn_frozen")
    probe.add_argument("--arch", default="auto", help="network, as for submit (default auto)")
    probe.add_argument("--width", type=int, help="CNN/ResNet first-stage channels")
    probe.add_argument("--resize", type=int, help="input.resize: shorter side in pixels")
    probe.add_argument("--crop", type=int, help="input.crop: square side after resize")
    probe.add_argument("--max-batch-size", type=int, default=256, help="largest batch size to measure (default 256)")
    probe.add_argument("--pack-size", type=int, help="runs per pack counted in `fits` (default: the server's)")
    probe.add_argument("--no-wait", action="store_true", help="print the probe id and return at once")
    probe.add_argument("--poll-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    probe.set_defaults(func=cmd_probe)
