"""One self-contained HTML file from a report's blocks: charts inlined as base64 PNG, tables sortable by a
click on their header (a few lines of inline JavaScript), no external requests."""

from __future__ import annotations

import base64
import html as html_lib
import re
from pathlib import Path

from quantarena.report.document import Block, Bullets, Heading, Image, Paragraph, Table

WIDE_PX = 1000

STYLE = """
body { font: 14px/1.5 system-ui, sans-serif; color: #1d2330; margin: 0; background: #f6f7f9; }
main { max-width: 1360px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 0 0 8px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-top: 12px; border-top: 1px solid #dde1e7; }
h3 { font-size: 15px; margin: 22px 0 8px; color: #3a4356; }
code { background: #eceff3; padding: 1px 5px; border-radius: 4px; font-size: 13px; }
.scroll { overflow-x: auto; background: #fff; border: 1px solid #dde1e7; border-radius: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { padding: 6px 10px; border-bottom: 1px solid #eef0f3; white-space: nowrap; }
td.text { white-space: normal; min-width: 120px; }
th { background: #f0f2f5; text-align: left; cursor: pointer; user-select: none; position: sticky; top: 0; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
th[data-order="asc"]::after { content: " ▲"; } th[data-order="desc"]::after { content: " ▼"; }
tr:hover td { background: #f7f9fc; }
td.ns { color: #7a8294; font-style: italic; }
tr.failed td, tr.skipped td { color: #a04040; }
.charts { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
figure { margin: 0; background: #fff; border: 1px solid #dde1e7; border-radius: 8px; padding: 8px; }
figure.wide { grid-column: 1 / -1; }
figure img { max-width: 100%; display: block; margin: 0 auto; }
figcaption { font-size: 12px; color: #6b7385; text-align: center; }
.recommend { background: #eef6ee; border-left: 4px solid #3c9a4a; padding: 8px 14px; border-radius: 4px; }
"""

SCRIPT = """
function sortKey(td) {
  if (td.dataset.v !== undefined) return parseFloat(td.dataset.v);
  const m = td.textContent.replace(/,/g, "").match(/[+-]?\\d*\\.?\\d+(e[+-]?\\d+)?/i);
  return m ? parseFloat(m[0]) : NaN;
}
document.querySelectorAll("table.sortable th").forEach(th => th.addEventListener("click", () => {
  const table = th.closest("table"), body = table.tBodies[0];
  const col = [...th.parentNode.children].indexOf(th);
  const asc = th.dataset.order !== "asc";
  table.querySelectorAll("th").forEach(h => delete h.dataset.order);
  th.dataset.order = asc ? "asc" : "desc";
  const text = th.classList.contains("text");
  const rows = [...body.rows];
  rows.sort((a, b) => {
    const x = a.cells[col], y = b.cells[col];
    let d;
    if (text) d = x.textContent.localeCompare(y.textContent);
    else {
      const kx = sortKey(x), ky = sortKey(y);
      d = isNaN(kx) ? (isNaN(ky) ? 0 : 1) : isNaN(ky) ? -1 : kx - ky;
      if (isNaN(kx) || isNaN(ky)) return d;  // blanks stay last either way
    }
    return asc ? d : -d;
  });
  rows.forEach(r => body.appendChild(r));
}));
"""


def inline(text: str) -> str:
    """Escape, then turn the document's two inline marks, `code` and **bold**, into tags."""
    out = html_lib.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _table(table: Table) -> str:
    kinds = {c: "num" if table.numeric(c) else "text" for c in table.columns}
    head = "".join(f'<th class="{kinds[c]}">{inline(c)}</th>' for c in table.columns)
    body = []
    for i, row in enumerate(table.rows):
        status = row.get("Status", "ok").split(":")[0]
        cells = []
        for c in table.columns:
            value = row.get(c, "")
            classes = [kinds[c]]
            if "not significant" in value:
                classes.append("ns")
            key = table.sort_keys.get((i, c))
            data = "" if key is None else f' data-v="{key!r}"'
            cells.append(f'<td class="{" ".join(classes)}"{data}>{inline(value)}</td>')
        body.append(f'<tr class="{html_lib.escape(status)}">{"".join(cells)}</tr>')
    return (
        f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _image(image: Image, base_dir: Path) -> str:
    png = (base_dir / image.path).read_bytes()
    wide = int.from_bytes(png[16:20], "big") > WIDE_PX  # the IHDR width: side-by-side panels span the grid
    data = base64.b64encode(png).decode("ascii")
    alt = html_lib.escape(image.alt)
    css = ' class="wide"' if wide else ""
    return f'<figure{css}><img src="data:image/png;base64,{data}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'


def html(blocks: list[Block], base_dir: Path, title: str) -> str:
    """``base_dir`` is where the images' relative paths start."""
    parts = []
    in_recommendation = False
    for i, block in enumerate(blocks):
        if isinstance(block, Image):
            # Consecutive charts share a two-column grid.
            opens = i == 0 or not isinstance(blocks[i - 1], Image)
            closes = i == len(blocks) - 1 or not isinstance(blocks[i + 1], Image)
            parts.append(
                ('<div class="charts">' if opens else "") + _image(block, base_dir) + ("</div>" if closes else "")
            )
        elif isinstance(block, Heading):
            in_recommendation = block.text == "Recommendation"
            parts.append(f"<h{block.level}>{inline(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            css = ' class="recommend"' if in_recommendation else ""
            parts.append(f"<p{css}>{inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{inline(item)}</li>" for item in block.items) + "</ul>")
        else:
            parts.append(_table(block))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html_lib.escape(title)}</title><style>{STYLE}</style></head>\n"
        f"<body><main>\n{chr(10).join(parts)}\n</main><script>{SCRIPT}</script></body></html>\n"
    )
