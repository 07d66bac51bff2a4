"""One self-contained HTML page of a comparison: sortable tables with intervals, figures, confusion matrices, the
environment and the command. Everything is inline (PNG/SVG as base64 data URIs, CSS, a few lines of JS), so the
file opens offline and can be mailed or committed alone.

    write_html_report("reports/x", "My study", rows, figures=[("trade-off", "reports/x/tradeoff.png")],
                      environment={"cpu": "..."}, command="emocompress benchmark ...")

Inputs are plain so that any comparison (the benchmark, a search's Pareto front) can use the same page: rows are
dicts; a column ``k`` whose rows also hold ``k_low`` and ``k_high`` is shown as ``value [low, high]`` (and ``k_std``
as ``± std``); in a difference column (its name holds ``diff``, ``change`` or ``Δ``) a cell whose interval excludes
0 is marked ``*`` and coloured.
"""

import base64
import html
import math
from collections.abc import Iterable
from pathlib import Path

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1500px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12.5px; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
td:first-child, th:first-child { text-align: left; }
table.sortable th { cursor: pointer; background: #f3f3f3; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; } th[aria-sort=descending]::after { content: " \\25BC"; }
td.worse { color: #b2182b; font-weight: bold; } td.better { color: #2166ac; font-weight: bold; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 12.5px; }
.confusions { display: flex; flex-wrap: wrap; gap: 1.5em; }
.confusions td { min-width: 3.5em; font-size: 11.5px; } .confusions caption { font-weight: bold; text-align: left; }
pre { background: #f6f6f6; padding: .7em; white-space: pre-wrap; word-break: break-all; }
.note { color: #555; } .wide { overflow-x: auto; } summary { cursor: pointer; margin: .5em 0; }
"""

# click a header: sort its table's rows by that column (numbers by data-sort, else text; empty cells last)
_JS = """
document.querySelectorAll("table.sortable").forEach(table => {
  table.querySelectorAll("th").forEach((th, col) => th.addEventListener("click", () => {
    const ascending = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th").forEach(h => h.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const key = row => {
      const cell = row.cells[col];
      return cell.dataset.sort !== undefined ? Number(cell.dataset.sort) : cell.textContent.trim();
    };
    const body = table.tBodies[0];
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = key(a), y = key(b);
      const xEmpty = x === "" || Number.isNaN(x), yEmpty = y === "" || Number.isNaN(y);
      if (xEmpty || yEmpty) return xEmpty - yEmpty;
      const order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return ascending ? order : -order;
    });
    rows.forEach(row => body.appendChild(row));
  }));
});
"""


def _number(value) -> str:
    """A short readable number: integers with thousands separators, floats to 4 significant digits.

    >>> _number(22715526), _number(0.88656038), _number(1.32e-07), _number(None)
    ('22,715,526', '0.8866', '1.32e-07', '')
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def is_difference(column: str) -> bool:
    return any(word in column for word in ("diff", "change", "Δ"))


def _cell(row: dict, column: str) -> str:
    """One ``<td>``: the value, ``± std`` and ``[low, high]`` where the row has them, a numeric ``data-sort``, and
    for a difference whose interval excludes 0 a ``*`` and the class ``worse``/``better``."""
    value = row.get(column)
    low, high, std = row.get(f"{column}_low"), row.get(f"{column}_high"), row.get(f"{column}_std")
    text = _number(value)
    if value is not None and std is not None:
        text += f" ± {std:.2g}"
    css = ""
    if value is not None and low is not None and high is not None:
        signed = is_difference(column)
        fmt = (lambda v: f"{v:+.3g}") if signed else _number
        text = (fmt(value) if signed else text) + f" [{fmt(low)}, {fmt(high)}]"
        if signed and (low > 0 or high < 0):
            text += " *"
            css = ' class="better"' if low > 0 else ' class="worse"'
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    sort = f' data-sort="{value}"' if numeric else ""
    return f"<td{css}{sort}>{html.escape(text)}</td>"


def html_table(rows: list[dict], columns: list[str] | None = None, caption: str = "") -> str:
    """A sortable ``<table>`` of ``rows``; ``columns``: default every key of the first row except the companions
    (``_low``, ``_high``, ``_std``) of another key."""
    if not rows:
        return '<p class="note">(no rows)</p>'
    if columns is None:
        keys = list(rows[0])
        columns = [k for k in keys if not any(k == f"{base}{suffix}" for base in keys
                                               for suffix in ("_low", "_high", "_std"))]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(_cell(row, c) for c in columns) + "</tr>" for row in rows)
    caption = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return (f'<div class="wide"><table class="sortable">{caption}<thead><tr>{head}</tr></thead><tbody>\n{body}\n'
            "</tbody></table></div>")


def confusion_table(name: str, labels: list[str], matrix: list[list[int]]) -> str:
    """A confusion matrix as a table (rows: true class, columns: predicted): each cell its count and row
    percentage, shaded by the percentage; text, not an image, so the page stays small and searchable."""
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    rows = []
    for label, counts in zip(labels, matrix, strict=True):
        total = max(1, sum(counts))
        cells = "".join(f'<td style="background: rgba(33, 102, 172, {c / total:.2f}); '
                        f'color: {"#fff" if c / total > 0.5 else "#222"}">{c}<br>{100 * c / total:.1f}%</td>'
                        for c in counts)
        rows.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    return (f"<table><caption>{html.escape(name)}</caption><thead><tr><th>true \\ predicted</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _image(path: Path) -> str:
    """``path`` (PNG or SVG) as an inline data URI."""
    kind = "svg+xml" if path.suffix.lower() == ".svg" else "png"
    return f"data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _environment_table(environment: dict) -> str:
    values = {k: ", ".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in environment.items()}
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(v)}</td></tr>" for k, v in values.items())
    return f"<table><tbody>{rows}</tbody></table>"


def write_html_report(out_dir: str | Path, title: str, rows: list[dict], figures: Iterable[tuple[str, Path]] = (),
                      environment: dict | None = None, command: str = "", per_class: list[dict] = (),
                      confusions: dict[str, dict] | None = None, columns: list[str] | None = None,
                      per_class_columns: list[str] | None = None, notes: str = "",
                      tables: Iterable[tuple[str, list[dict]]] = (), filename: str = "report.html") -> Path:
    """Write ``out_dir/report.html``, one self-contained page (no network).

    Args:
        out_dir: the folder of the report (it must exist).
        title: the page's heading.
        rows: the comparison, one dict per model (see the module docstring for intervals and differences).
        figures: (caption, path of a PNG or SVG file) pairs, inlined in this order.
        environment: what it ran on (CPU, flags, versions, settings): a table.
        command: the command that produced the report.
        per_class: rows of a per-class table (one per model and class).
        confusions: model name -> ``{"labels": [...], "matrix": [[...]]}`` (rows: true class).
        columns, per_class_columns: the columns to show (default: every key but interval companions).
        notes: a paragraph under the comparison table (plain text).
        tables: more (heading, rows) tables, after the figures (the search's test verdict).

    Returns:
        The page's path.
    """
    parts = [f"<h1>{html.escape(title)}</h1>", "<h2>Comparison</h2>",
             '<p class="note">Click a header to sort. [low, high]: 95% interval; * and colour: a difference whose '
             "interval excludes 0 (red: worse, blue: better).</p>", html_table(rows, columns)]
    if notes:
        parts.append(f'<p class="note">{html.escape(notes)}</p>')
    for caption, path in figures:
        parts.append(f'<figure><img src="{_image(Path(path))}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    for heading, table_rows in tables:
        parts += [f"<h2>{html.escape(heading)}</h2>", html_table(list(table_rows))]
    if per_class:
        parts += ["<h2>Per class</h2>", f"<details><summary>the per-class table ({len(per_class)} rows)</summary>",
                  html_table(list(per_class), per_class_columns), "</details>"]
    if confusions:
        parts += ["<h2>Confusion matrices</h2>", '<div class="confusions">',
                  *(confusion_table(name, c["labels"], c["matrix"]) for name, c in confusions.items()), "</div>"]
    if environment:
        parts += ["<h2>Environment</h2>", _environment_table(environment)]
    parts += ["<h2>Command</h2>", f"<pre><code>{html.escape(command or '(not recorded)')}</code></pre>"]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + f"\n<script>{_JS}</script></body></html>\n")
    out = Path(out_dir) / filename
    out.write_text(page, encoding="utf-8")
    return out
