"""The model beside other threads: GIL contention and intra-op thread counts.

- Contention: log-likelihood alone and beside a busy pure-Python thread (what the
  service's event loop is while a batch computes), at several GIL switch intervals: how
  much a model that takes the GIL back after every tensor op loses.
- Thread sweep: log-likelihood of the plain model, the served form and the peer for each
  intra-op thread count, in interleaved rounds with their range: at batch 1 a second
  thread can cost more than it gives, by an amount that moves from minute to minute.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from bench.models import folded_model, traced_model
from bench.timing import measure
from model.glow import Glow
from service.tuning import model_threads


class BusyThread:
    """A thread running pure Python (as the service's event loop does while a batch computes)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="busy-python", daemon=True)

    def _spin(self) -> None:
        total = 0
        while not self._stop.is_set():
            for i in range(2000):
                total += i * i

    def __enter__(self) -> BusyThread:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def run_contention(
    model: Glow, images: Tensor, batches: list[int], intervals: list[float], args: argparse.Namespace,
    sync: Callable[[], None] | None,
) -> list[dict[str, Any]]:
    """log-likelihood with a busy Python thread in the process, at several GIL switch intervals."""
    variants: list[tuple[str, Callable[[Tensor], Tensor]]] = [("model", model.log_prob)]
    try:
        folded = folded_model(model, channels_last=True)
        variants.append(("folded+channels_last", folded.log_prob))
        traced = traced_model(model)
        variants.append(("folded+traced", traced.log_prob))
    except Exception as exc:  # keep the section even if a variant does not build here
        print(f"note: contention variants skipped ({type(exc).__name__}: {exc})")
    print("\nGIL contention: log-likelihood ms/call, alone and beside a busy pure-Python thread (the service's "
          "event loop, simulated), by sys.setswitchinterval")
    header = f"{'variant':<22}{'batch':>6}{'alone':>9}"
    for interval in intervals:
        header += f"{f'busy@{interval * 1e3:g}ms':>14}"
    print(header)
    rows = []
    default_interval = sys.getswitchinterval()
    try:
        for batch in batches:
            x = images[:batch].to(args.device)
            for name, fn in variants:
                with torch.inference_mode():
                    alone = measure(lambda: fn(x), min_time=args.min_time, min_repeats=args.min_repeats, sync=sync)
                    line = f"{name:<22}{batch:>6}{alone.median * 1e3:>9.2f}"
                    row: dict[str, Any] = {"variant": name, "batch": batch, "alone_ms": alone.median * 1e3}
                    for interval in intervals:
                        sys.setswitchinterval(interval)
                        with BusyThread():
                            busy = measure(lambda: fn(x), min_time=args.min_time, min_repeats=args.min_repeats,
                                           sync=sync)
                        sys.setswitchinterval(default_interval)
                        line += f"{busy.median * 1e3:>9.2f} ({busy.median / alone.median:.1f}x)"
                        row[f"busy_ms@{interval}"] = busy.median * 1e3
                print(line)
                rows.append(row)
    finally:
        sys.setswitchinterval(default_interval)
    return rows


# --------------------------------------------------------- thread sweep
def run_thread_sweep(
    model: Glow, peer: nn.Module | None, images: Tensor, batches: list[int], thread_counts: list[int],
    rounds: int, args: argparse.Namespace, sync: Callable[[], None] | None,
) -> list[dict[str, Any]]:
    """log-likelihood of the plain model, the served form and the peer at each (threads, batch), in
    ``rounds`` interleaved rounds (every variant once per round): median and range over the rounds.

    At batch 1 every op is tiny, so intra-op threads cost a wake-up per op more than they save, and
    that cost moves with what else the cores are doing: one figure per variant hides it."""
    variants: list[tuple[str, Callable[[Tensor], Tensor]]] = [("plain", model.log_prob)]
    try:
        variants.append(("served (traced)", traced_model(model).log_prob))
    except Exception as exc:
        print(f"note: the served form does not build here ({type(exc).__name__}: {exc})")
    if peer is not None:
        variants.append(("peer", peer.log_prob))
    print(f"\nthread sweep: log-likelihood img/s by intra-op threads, median [min-max] of {rounds} interleaved "
          f"rounds of {args.min_time:g} s; the service runs its model on {service_threads()} thread(s) here")
    header = f"{'threads':>7}{'batch':>6}" + "".join(f"{name:>26}" for name, _ in variants)
    if peer is not None:
        header += f"{'served/peer':>13}"
    print(header)
    saved = torch.get_num_threads()
    rows = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for batch in batches:
                x = images[:batch].to(args.device)
                rates: dict[str, list[float]] = {name: [] for name, _ in variants}
                with torch.inference_mode():
                    for _ in range(rounds):
                        for name, fn in variants:
                            t = measure(lambda: fn(x), min_time=args.min_time, min_repeats=args.min_repeats, sync=sync)
                            rates[name].append(t.per_second(batch))
                row: dict[str, Any] = {"threads": threads, "batch": batch, "images_per_s": rates}
                line = f"{threads:>7}{batch:>6}"
                for name, _ in variants:
                    r = rates[name]
                    line += f"{statistics.median(r):>12.1f} [{min(r):.0f}-{max(r):.0f}]".rjust(26)
                if peer is not None and "served (traced)" in rates:
                    ratio = statistics.median(rates["served (traced)"]) / statistics.median(rates["peer"])
                    row["served_over_peer"] = ratio
                    line += f"{ratio:>12.2f}x"
                print(line)
                rows.append(row)
    finally:
        torch.set_num_threads(saved)
    at = next((r for r in rows if r["threads"] == service_threads() and r["batch"] == 1 and "served_over_peer" in r),
              None)
    if at is not None:
        print(f"  batch 1 at the service's {at['threads']} thread(s): served form {at['served_over_peer']:.2f}x "
              f"the peer (target >= 3x)")
    return rows


def service_threads() -> int:
    """The intra-op threads ``python -m service`` gives its model on this machine by default."""
    return model_threads(0)
