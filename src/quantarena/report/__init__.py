"""Reports: statistics, roofline and recommendation computed once from results, written as Markdown, CSV,
JSON, PNG charts and one HTML file. A report knows results, never methods, tasks or how they ran."""

from quantarena.report.analysis import Group, Report, Run
from quantarena.report.recommend import Constraints
from quantarena.report.sections import table_rows
from quantarena.report.write import CSV_COLUMNS, write_report

__all__ = ["CSV_COLUMNS", "Constraints", "Group", "Report", "Run", "table_rows", "write_report"]
