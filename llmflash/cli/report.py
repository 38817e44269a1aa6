"""Human-readable tables of per-token statistics (the JSON carries the same numbers)."""

from __future__ import annotations

import statistics


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    q = statistics.quantiles(values, n=10)
    return f"{q[0]:.2f}-{q[-1]:.2f}"


def stats_table(stats: dict, mode: str) -> str:
    """Median and p10-p90 spread per token of I/O, memory management, compute, bytes, reads."""
    rows = [("io ms", stats.get("io_ms", [])), ("mem ms", stats.get("mem_ms", [])),
            ("compute ms", stats.get("compute_ms", [])),
            ("KiB read", [b / 1024 for b in stats.get("bytes_per_token", [])]),
            ("reads", [float(r) for r in stats.get("reads_per_token", [])])]
    if "rows_used" in stats:
        rows.append(("cache rows", [float(r) for r in stats["rows_used"]]))
        rows.append(("neurons loaded", [float(r) for r in stats["neurons_loaded"]]))
    lines = [f"per-token stats, mode {mode} ({len(stats.get('io_ms', []))} decode tokens)",
             f"{'':16}{'median':>12}{'p10-p90':>20}"]
    for name, values in rows:
        lines.append(f"{name:16}{_median(values):12.2f}{_spread(values):>20}")
    lines.append(f"bytes read by the process (resident load included): {stats.get('bytes_read', 0):,}")
    if "memory_plan" in stats:
        plan = stats["memory_plan"]
        lines.append(f"memory plan: budget {plan['budget_bytes'] / 2**20:.1f} MiB, resident "
                     f"{plan['resident_bytes'] / 2**20:.1f} MiB, caches {plan['cache_bytes'] / 2**20:.1f} MiB "
                     f"({100 * plan['capacity_fraction']:.1f}% of the FFN, sized {plan['sized_from']}), "
                     f"selector {stats.get('selector')} ({stats.get('selector_bytes', 0) / 2**20:.1f} MiB)")
    return "\n".join(lines)
