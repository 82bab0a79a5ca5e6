"""Search over the operator's documents: SQLite FTS5 with BM25 ranking.

The collection is a folder of Markdown/text files. Each file is split at its `##`
headings, so a hit points at the section that answers, and indexed with the Porter
stemmer ("refunds" finds "refund"). The index lives in its own SQLite file and follows the
folder: before a search, files whose size or modification time changed are re-read, new
ones added and deleted ones dropped.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.dispatch.spec import ToolSpec, load_tool_schema
from agent.dispatch.types import CallContext, SideEffect, ToolError
from tools.sqlite_db import connection, prepare, transaction

SUFFIXES = (".md", ".markdown", ".txt")
# Title matches count five times as much as body matches.
TITLE_WEIGHT, BODY_WEIGHT = 5.0, 1.0
# Words that say nothing about the topic; dropping them keeps OR-queries on point.
_STOPWORDS_TEXT = """
a about am an and any are as at be been but by can could did do does for from get got had
has have how i if in into is it its me my no not of on or our please so than that the their
them then there this to was we what when where which who why will with would you your
"""
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    path TEXT PRIMARY KEY, mtime_ns INTEGER NOT NULL, size INTEGER NOT NULL, title TEXT
);
CREATE VIRTUAL TABLE IF NOT EXISTS sections USING fts5(
    title, body, path UNINDEXED, tokenize = 'porter unicode61'
);
"""


@dataclass(frozen=True)
class SearchHit:
    title: str
    snippet: str
    source: str
    score: float


class SearchIndex:
    def __init__(self, docs_dir: Path, db_path: Path, refresh_interval_s: float = 1.0):
        self.docs_dir = Path(docs_dir)
        self.db_path = Path(db_path)
        self.refresh_interval_s = refresh_interval_s
        self._checked_at = float("-inf")
        self._lock = threading.Lock()
        prepare(self.db_path, SCHEMA)

    def refresh(self, force: bool = False) -> int:
        """Bring the index in line with the folder; returns how many files changed."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked_at < self.refresh_interval_s:
                return 0
            self._checked_at = now
            on_disk = _scan(self.docs_dir)
            with transaction(self.db_path) as db:  # one indexer at a time, across processes
                return _apply(db, self.docs_dir, on_disk)

    def search(self, query: str, limit: int = 3) -> list[SearchHit]:
        """The best section of each of the `limit` best-matching documents."""
        match = fts_query(query)
        if match is None:
            raise ToolError("the query has no searchable words; say what to look for")
        self.refresh()
        with connection(self.db_path) as db:
            rows = db.execute(
                "SELECT title, snippet(sections, 1, '', '', '…', 32), path, "
                "bm25(sections, ?, ?) AS rank FROM sections WHERE sections MATCH ? "
                "ORDER BY rank LIMIT ?",
                (TITLE_WEIGHT, BODY_WEIGHT, match, limit * 4)).fetchall()
        hits: list[SearchHit] = []
        seen: set[str] = set()
        for title, snippet, path, rank in rows:
            if path in seen:
                continue
            seen.add(path)
            # bm25() is lower-is-better and negative; flip it so a higher score is better.
            hits.append(SearchHit(title, " ".join(snippet.split()), path, round(-rank, 4)))
            if len(hits) == limit:
                break
        return hits

    def tool_output(self, query: str, limit: int) -> dict[str, Any]:
        hits = self.search(query, limit)
        output: dict[str, Any] = {"query": query, "results": [asdict(hit) for hit in hits]}
        if not hits:
            output["message"] = "no article matches; say so rather than guess"
        return output


def fts_query(text: str) -> str | None:
    """Free text as an FTS5 query: each meaningful word quoted, any of them may match."""
    words = [w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS]
    unique = list(dict.fromkeys(words))
    if not unique:
        return None
    return " OR ".join(f'"{word}"' for word in unique)


def _scan(folder: Path) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in SUFFIXES and path.is_file():
            stat = path.stat()
            found[path.relative_to(folder).as_posix()] = (stat.st_mtime_ns, stat.st_size)
    return found


def _apply(db: sqlite3.Connection, folder: Path, on_disk: dict[str, tuple[int, int]]) -> int:
    indexed = {path: (mtime, size) for path, mtime, size in
               db.execute("SELECT path, mtime_ns, size FROM documents")}
    changed = 0
    for path in indexed.keys() - on_disk.keys():
        db.execute("DELETE FROM sections WHERE path = ?", (path,))
        db.execute("DELETE FROM documents WHERE path = ?", (path,))
        changed += 1
    for path, stamp in on_disk.items():
        if indexed.get(path) == stamp:
            continue
        text = (folder / path).read_text(encoding="utf-8", errors="replace")
        title, sections = split_sections(text, Path(path).stem)
        db.execute("DELETE FROM sections WHERE path = ?", (path,))
        db.executemany("INSERT INTO sections (title, body, path) VALUES (?, ?, ?)",
                       [(heading, body, path) for heading, body in sections])
        db.execute("INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?)",
                   (path, stamp[0], stamp[1], title))
        changed += 1
    return changed


def split_sections(text: str, fallback_title: str) -> tuple[str, list[tuple[str, str]]]:
    """(document title, [(section title, section text)]) split at `##` headings."""
    title = fallback_title.replace("-", " ").replace("_", " ").strip().capitalize()
    sections: list[tuple[str, list[str]]] = [(title, [])]
    for line in text.splitlines():
        if line.startswith("# ") and not sections[0][1] and len(sections) == 1:
            title = line[2:].strip()
            sections[0] = (title, [])
        elif line.startswith("## "):
            sections.append((f"{title} — {line[3:].strip()}", []))
        else:
            sections[-1][1].append(line)
    out = [(heading, "\n".join(lines).strip()) for heading, lines in sections]
    return title, [(heading, body) for heading, body in out if body or heading == title]


SEARCH_DESCRIPTION = (
    "Search the customer-support knowledge base (policies, opening hours, shipping, "
    "returns, accounts, billing). Use it before answering such questions; answer from the "
    "returned snippets and name the article.")


def search_tools(index: SearchIndex, timeout_s: float = 5.0) -> list[ToolSpec]:
    async def search(arguments: dict[str, Any], context: CallContext) -> dict[str, Any]:
        return await asyncio.to_thread(index.tool_output, arguments["query"],
                                       int(arguments.get("limit", 3)))

    return [ToolSpec("search_knowledge_base", SEARCH_DESCRIPTION,
                     load_tool_schema("search_knowledge_base"), search,
                     SideEffect.READ_ONLY, timeout_s)]
