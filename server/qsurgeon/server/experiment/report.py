"""``qsurgeon experiment report DIR``: what the quantum backend bought, from ``experiment.jsonl``.

Reads the record a prune (``--out``) or ``qsurgeon solve --out`` wrote and, when there,
the run's ``report.json``. Prints tables and draws plots (matplotlib, Agg backend):

- per backend: blocks, gap to the reference (mean, median, worst), better/equal/worse,
  feasible-before-repair fraction, repair flips, chain breaks, time and cost per block;
- the gap to the reference against block size (``gap_vs_size.png``);
- time and cost per block (``time_cost.png``) and the cumulative cost over the run
  (``cumulative_cost.png``);
- with ``--classical DIR`` (a classical-only run of the same model and seed), the final
  relative layer error of every tensor next to the classical run's (``quality.png``).

Gaps are relative, (E − E_ref)/|E_ref|: positive means the backend's answer was worse
than the reference's on that block, negative that the hardware found a better one.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable

from qsurgeon.client.errors import UsageError
from qsurgeon.worker.experiment import RECORD_FILE, read_records

REPORT_NAME = "report.json"
PLOTS = ("gap_vs_size.png", "time_cost.png", "cumulative_cost.png", "quality.png")


def load_run(directory: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(records, report.json or None) of a run folder; UsageError when it holds no record."""
    folder = Path(directory)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    path = folder / RECORD_FILE
    if not path.is_file():
        raise UsageError(f"{folder}: no {RECORD_FILE} (run qsurgeon prune with --reference, --route or a cloud "
                         "solver, or qsurgeon solve with --out)")
    records = read_records(path)
    if not records:
        raise UsageError(f"{path}: holds no records")
    return records, _read_report(folder)


def _read_report(folder: Path) -> dict[str, Any] | None:
    path = folder / REPORT_NAME
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise UsageError(f"{path}: not a readable report") from None
    return report if isinstance(report, dict) else None


def _numbers(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))]


def _mean(values: Iterable[Any]) -> float | None:
    numbers = _numbers(values)
    return sum(numbers) / len(numbers) if numbers else None


def _versus(records: list[dict[str, Any]]) -> dict[str, int]:
    counts = {"better": 0, "equal": 0, "worse": 0}
    for record in records:
        energy, reference = record.get("energy"), record.get("reference_energy")
        if energy is None or reference is None:
            continue
        tolerance = 1e-9 * max(1.0, abs(reference))
        key = "better" if energy < reference - tolerance else "worse" if energy > reference + tolerance else "equal"
        counts[key] += 1
    return counts


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers of the report: per backend and per block size."""
    by_backend: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        key = (str(record.get("backend")), str(record.get("route")))
        by_backend.setdefault(key, []).append(record)
    backends = []
    for (backend, route), group in sorted(by_backend.items()):
        gaps = _numbers(record.get("gap") for record in group)
        costs = _numbers(record.get("cost_usd") for record in group)
        backends.append({
            "backend": backend, "route": route, "blocks": len(group),
            "failed": sum(1 for record in group if record.get("failure")),
            "gap_mean": _mean(gaps), "gap_median": statistics.median(gaps) if gaps else None,
            "gap_worst": max(gaps) if gaps else None, **_versus(group),
            "feasible_before_repair": _mean(record.get("feasible_before_repair_fraction") for record in group),
            "repair_flips": _mean(record.get("repair_flips") for record in group),
            "chain_break_fraction": _mean(record.get("chain_break_fraction") for record in group),
            "wall_seconds": _mean(record.get("wall_seconds") for record in group),
            "qpu_seconds": sum(_numbers(record.get("qpu_seconds") for record in group)),
            "cost_usd": sum(costs) if costs else None,
            "fallbacks": sum(1 for record in group if record.get("fallback_reason")),
        })
    sizes: dict[int, list[float]] = {}
    for record in records:
        if record.get("route") in ("quantum", "solver") and isinstance(record.get("gap"), (int, float)):
            sizes.setdefault(int(record.get("B") or 0), []).append(float(record["gap"]))
    by_size = [{"B": size, "blocks": len(gaps), "gap_mean": sum(gaps) / len(gaps), "gap_worst": max(gaps)}
               for size, gaps in sorted(sizes.items())]
    costs = _numbers(record.get("cost_usd") for record in records)
    return {"blocks": len(records), "backends": backends, "by_size": by_size,
            "total_cost_usd": sum(costs) if costs else None,
            "total_qpu_seconds": sum(_numbers(record.get("qpu_seconds") for record in records)),
            "total_wall_seconds": sum(_numbers(record.get("wall_seconds") for record in records))}


def quality(report: dict[str, Any] | None, classical: dict[str, Any] | None) -> dict[str, Any] | None:
    """Final relative layer errors of this run and of the classical one, per tensor and overall."""
    if report is None:
        return None
    tensors = report.get("tensors") or {}
    other = (classical or {}).get("tensors") or {}
    rows = [{"tensor": name, "error": facts.get("error_final"), "classical_error": other.get(name, {}).get("error_final")}
            for name, facts in sorted(tensors.items())]
    summary = report.get("summary") or {}
    return {"error_initial": summary.get("relative_error_initial"), "error_final": summary.get("relative_error_final"),
            "classical_error_final": ((classical or {}).get("summary") or {}).get("relative_error_final"),
            "tensors": rows}


def _format(value: Any, spec: str = ".3g", percent: bool = False) -> str:
    if value is None:
        return "–"
    if percent:
        return f"{100 * value:.3f} %"
    return format(value, spec) if isinstance(value, float) else str(value)


def tables(summary: dict[str, Any], quality_facts: dict[str, Any] | None) -> str:
    """Markdown tables of the report."""
    lines = ["| backend | route | blocks | gap mean | gap median | gap worst | better / equal / worse vs reference "
             "| feasible before repair | repair flips | chain breaks | wall s per block | QPU s | cost (USD) "
             "| fallbacks |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["backends"]:
        lines.append(
            f"| {row['backend']} | {row['route']} | {row['blocks']} | {_format(row['gap_mean'], percent=True)} | "
            f"{_format(row['gap_median'], percent=True)} | {_format(row['gap_worst'], percent=True)} | "
            f"{row['better']} / {row['equal']} / {row['worse']} | {_format(row['feasible_before_repair'], '.2f')} | "
            f"{_format(row['repair_flips'], '.1f')} | {_format(row['chain_break_fraction'], '.3f')} | "
            f"{_format(row['wall_seconds'], '.4f')} | {_format(row['qpu_seconds'], '.4f')} | "
            f"{_format(row['cost_usd'], '.2f')} | {row['fallbacks']} |")
    if summary["by_size"]:
        lines += ["", "| B | blocks | gap mean | gap worst |", "|---|---|---|---|"]
        lines += [f"| {row['B']} | {row['blocks']} | {_format(row['gap_mean'], percent=True)} | "
                  f"{_format(row['gap_worst'], percent=True)} |" for row in summary["by_size"]]
    lines += ["", f"blocks {summary['blocks']}; QPU seconds {summary['total_qpu_seconds']:.4g}; cost "
              f"{_format(summary['total_cost_usd'], '.2f')} USD; backend wall seconds {summary['total_wall_seconds']:.4g}"]
    if quality_facts is not None:
        lines += ["", f"relative layer error: {_format(quality_facts['error_initial'], '.5f')} initial -> "
                  f"{_format(quality_facts['error_final'], '.5f')} this run; classical run "
                  f"{_format(quality_facts['classical_error_final'], '.5f')}"]
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], quality_facts: dict[str, Any] | None, folder: Path) -> list[Path]:
    """The report's PNG files in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    routed = [r for r in records if r.get("route") in ("quantum", "solver") and isinstance(r.get("gap"), (int, float))]

    figure, axis = plt.subplots(figsize=(6, 4))
    for backend in sorted({str(r.get("backend")) for r in routed}):
        points = [r for r in routed if str(r.get("backend")) == backend]
        axis.scatter([r["B"] for r in points], [100 * r["gap"] for r in points], s=12, alpha=0.6, label=backend)
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_xlabel("block size B")
    axis.set_ylabel("gap to the reference (%)")
    axis.set_title("gap to the classical reference, per block")
    if routed:
        axis.legend(fontsize=8)
    written.append(_save(figure, folder / PLOTS[0]))

    ordered = [r for r in records if r.get("route") in ("quantum", "solver")] or records
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(range(len(ordered)), [r.get("wall_seconds") or 0.0 for r in ordered], ".", markersize=3)
    left.set_xlabel("block (in the order solved)")
    left.set_ylabel("wall seconds")
    left.set_title("time per block")
    right.plot(range(len(ordered)), [r.get("cost_usd") or 0.0 for r in ordered], ".", markersize=3, color="C1")
    right.set_xlabel("block (in the order solved)")
    right.set_ylabel("cost estimate (USD)")
    right.set_title("cost per block")
    written.append(_save(figure, folder / PLOTS[1]))

    figure, axis = plt.subplots(figsize=(6, 4))
    cost, qpu, costs, qpus = 0.0, 0.0, [], []
    for record in ordered:
        cost += record.get("cost_usd") or 0.0
        qpu += record.get("qpu_seconds") or 0.0
        costs.append(cost)
        qpus.append(qpu)
    axis.plot(range(1, len(costs) + 1), costs, label="cost (USD)")
    axis.set_xlabel("blocks solved")
    axis.set_ylabel("cumulative cost (USD)")
    twin = axis.twinx()
    twin.plot(range(1, len(qpus) + 1), qpus, color="C1", label="device seconds")
    twin.set_ylabel("cumulative device seconds")
    axis.set_title("cumulative cost over the run")
    written.append(_save(figure, folder / PLOTS[2]))

    if quality_facts is not None and quality_facts["tensors"]:
        rows = quality_facts["tensors"]
        figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4))
        positions = range(len(rows))
        axis.bar([p - 0.2 for p in positions], [r["error"] or 0.0 for r in rows], width=0.4, label="this run")
        if any(r["classical_error"] is not None for r in rows):
            axis.bar([p + 0.2 for p in positions], [r["classical_error"] or 0.0 for r in rows], width=0.4,
                     label="classical run")
        axis.set_xticks(list(positions))
        axis.set_xticklabels([r["tensor"].removesuffix(".weight")[-28:] for r in rows], rotation=45, ha="right",
                             fontsize=7)
        axis.set_ylabel("final relative layer error")
        axis.set_title("quality of the pruned model")
        axis.legend(fontsize=8)
        written.append(_save(figure, folder / PLOTS[3]))
    return written


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def experiment_report(directory: str | Path, *, classical: str | Path | None = None,
                      out: str | Path | None = None, plots: bool = True) -> dict[str, Any]:
    """Everything ``qsurgeon experiment report`` shows: summary, quality, tables, the plots' paths."""
    records, report = load_run(directory)
    classical_report = None
    if classical is not None:
        classical_report = _read_report(Path(classical))
        if classical_report is None:
            raise UsageError(f"{classical}: no {REPORT_NAME} (give the --out folder of the classical run)")
        mine, theirs = (report or {}).get("options", {}), classical_report.get("options", {})
        if mine and theirs and mine.get("seed") != theirs.get("seed"):
            raise UsageError(f"{classical}: the classical run used seed {theirs.get('seed')}, this one "
                             f"{mine.get('seed')}; compare runs of the same seed")
    summary = summarize(records)
    facts = quality(report, classical_report)
    folder = Path(out) if out is not None else Path(directory) / "experiment-report"
    written = plot(records, facts, folder) if plots else []
    result = {"summary": summary, "quality": facts, "tables": tables(summary, facts),
              "plots": [str(path) for path in written]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "experiment_report.json").write_text(json.dumps({k: v for k, v in result.items() if k != "tables"},
                                                              indent=2))
    (folder / "experiment_report.md").write_text(result["tables"] + "\n")
    return result


__all__ = ["PLOTS", "experiment_report", "load_run", "plot", "quality", "summarize", "tables"]
