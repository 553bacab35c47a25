"""The result table of the side-by-side benchmarks.

A `Row` is one metric of one workload: per system its runs, a target and a
verdict. A `Report` holds the rows; it prints them as a text table (medians,
campaignd/peer ratios, then the rows' notes), as the Markdown table of
docs/benchmarks.md, or as JSON (and reads that JSON back, for bench.table).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from dataclasses import field


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


@dataclass
class Row:
    """One line of the table: a metric, per system its runs, and a verdict."""

    workload: str
    metric: str
    values: dict[str, list]  # system -> one value per run
    fmt: str = "{:.0f}"
    ratio: bool = True  # print campaignd/peer ratios
    target: str = ""
    verdict: str = ""
    note: str = ""

    def med(self, system: str):
        vals = self.values.get(system, [])
        if vals and all(isinstance(v, (int, float)) for v in vals):
            return median(vals)
        return vals[0] if vals else None


@dataclass
class Report:
    systems: list[str]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def _cells(self, peer: str) -> tuple[list[str], list[list[str]]]:
        head = ["workload", "metric"] + self.systems
        ratio_systems = [s for s in self.systems if s != peer and s != "ceiling"]
        head += [f"{s}/peer" for s in ratio_systems] + ["target", "verdict"]
        lines = []
        for row in self.rows:
            cells = [row.workload, row.metric]
            for system in self.systems:
                cells.append(_cell(row.med(system), row.fmt))
            for system in ratio_systems:
                cells.append(_ratio(row, system, peer))
            cells += [row.target, row.verdict]
            lines.append(cells)
        return head, lines

    def markdown(self, peer: str = "peer") -> str:
        """The table as docs/benchmarks.md shows it, then the rows' notes."""
        head, lines = self._cells(peer)
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for cells in lines:
            text = [c.replace("|", "/") for c in map(str, cells)]
            out.append("| " + " | ".join(text) + " |")
        notes = [f"- {r.workload} {r.metric}: {r.note}" for r in self.rows if r.note]
        notes += [f"- {n}" for n in self.notes]
        return "\n".join(out + ([""] + notes if notes else []))

    @classmethod
    def from_json(cls, data: dict) -> Report:
        report = cls(list(data["systems"]), notes=list(data.get("notes", [])))
        for r in data["rows"]:
            report.add(
                Row(
                    r["workload"],
                    r["metric"],
                    r["runs"],
                    fmt=r.get("fmt", "{:.0f}"),
                    ratio=r.get("ratio", True),
                    target=r["target"],
                    verdict=r["verdict"],
                    note=r["note"],
                )
            )
        return report

    def render(self, peer: str = "peer") -> str:
        head, lines = self._cells(peer)
        cols = zip(head, *lines, strict=True)
        widths = [max(len(str(x)) for x in col) for col in cols]
        out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
        out.append("  ".join("-" * w for w in widths))
        for cells in lines:
            out.append(
                "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))
            )
        for row in self.rows:
            if row.note:
                out.append(f"  [{row.workload} {row.metric}] {row.note}")
        out += [f"  {n}" for n in self.notes]
        return "\n".join(out)

    def to_json(self) -> dict:
        return {
            "systems": self.systems,
            "rows": [
                {
                    "workload": r.workload,
                    "metric": r.metric,
                    "runs": r.values,
                    "median": {s: r.med(s) for s in self.systems},
                    "fmt": r.fmt,
                    "ratio": r.ratio,
                    "target": r.target,
                    "verdict": r.verdict,
                    "note": r.note,
                }
                for r in self.rows
            ],
            "notes": self.notes,
        }


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return fmt.format(value)


def _ratio(row: Row, system: str, peer: str) -> str:
    if not row.ratio:
        return ""
    ours, theirs = row.med(system), row.med(peer)
    if not isinstance(ours, (int, float)) or not isinstance(theirs, (int, float)):
        return ""
    if theirs == 0:
        return ""
    return f"{ours / theirs:.2f}x"
