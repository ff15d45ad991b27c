"""Database queries grouped for the report: what a post or a batch costs the database."""

from __future__ import annotations

import re
from collections import Counter


def breakdown(queries: list[dict[str, str]]) -> list[tuple[str, int]]:
    """Queries grouped by their first words and table, most frequent first."""
    kinds: Counter[str] = Counter()
    for query in queries:
        sql = query["sql"]
        table = re.search(r'(?:FROM|INTO|UPDATE)\s+"?(\w+)"?', sql, re.IGNORECASE)
        verb = sql.split(None, 1)[0].upper() if sql.strip() else "?"
        if verb == "SELECT" and "COUNT(" in sql.upper():
            verb = "SELECT COUNT"
        kinds[f"{verb} {table[1] if table else ''}".strip()] += 1
    return kinds.most_common()
