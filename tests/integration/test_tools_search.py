"""Knowledge-base search: SQLite FTS5/BM25 over the shipped sample, and a live folder."""

import itertools
import shutil

import pytest

from agent.dispatch.config import BUNDLED_KB
from agent.dispatch.types import ToolError
from tools.search import SearchIndex


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return SearchIndex(BUNDLED_KB, tmp_path_factory.mktemp("search") / "index.sqlite3")


@pytest.mark.parametrize(("query", "article"), [
    ("How do I reset my password?", "password-reset.md"),
    ("I forgot my password and can't log in", "password-reset.md"),
    ("Are you open on Sunday evening?", "opening-hours.md"),
    ("Can I get my money back for something I bought?", "returns-and-refunds.md"),
    ("where is my package", "order-tracking.md"),
    ("do you deliver to Germany", "shipping-and-delivery.md"),
    ("I was charged twice on my card", "billing-and-invoices.md"),
    ("how long is a gift card valid", "gift-cards.md"),
    ("is there anything gluten free on the menu", "allergens-and-dietary.md"),
    ("what happens if we arrive late for our table", "reservations-policy.md"),
    ("delete my personal data", "account-and-privacy.md"),
])
def test_the_right_article_ranks_first(index, query, article):
    hits = index.search(query, limit=3)
    assert hits[0].source == article, [h.source for h in hits]
    assert hits[0].score > 0 and all(a.score >= b.score for a, b in itertools.pairwise(hits))


def test_a_hit_carries_a_title_a_snippet_from_the_text_and_its_source(index):
    hit = index.search("refund card statement days", limit=1)[0]
    assert hit.title.startswith("Returns and refunds")
    assert "statement" in hit.snippet and len(hit.snippet) < 400
    assert hit.source == "returns-and-refunds.md"


def test_stemming_matches_other_forms_of_a_word(index):
    assert index.search("refunding", limit=1)[0].source == "returns-and-refunds.md"


def test_each_document_appears_once_and_the_limit_holds(index):
    hits = index.search("booking reservation table cancel deposit party", limit=5)
    assert len(hits) <= 5 and len({h.source for h in hits}) == len(hits)


def test_nothing_to_search_for_is_a_tool_error_and_no_match_is_empty(index):
    with pytest.raises(ToolError):
        index.search("how do I ?")
    output = index.tool_output("xylophone quokka", 3)
    assert output["results"] == [] and "no article" in output["message"]


def test_punctuation_and_fts_syntax_in_queries_are_harmless(index):
    for query in ['"unbalanced', "NEAR(password reset)", "password* OR", "返品 refund"]:
        index.search(query)


def test_the_index_follows_the_folder(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(BUNDLED_KB, docs)
    live = SearchIndex(docs, tmp_path / "index.sqlite3", refresh_interval_s=0)
    assert live.search("parking garage", limit=1) == []

    (docs / "parking.md").write_text("# Parking\n\nThe garage on Quay Street is free "
                                     "for guests after 6 pm.\n")
    assert live.search("parking garage", limit=1)[0].source == "parking.md"

    (docs / "parking.md").write_text("# Parking\n\nThere is no parking; take the ferry.\n")
    hit = live.search("parking", limit=1)[0]
    assert "ferry" in hit.snippet and "garage" not in hit.snippet

    (docs / "parking.md").unlink()
    assert live.search("parking ferry", limit=1) == []


def test_a_second_index_on_the_same_file_sees_the_same_documents(tmp_path, index):
    again = SearchIndex(BUNDLED_KB, index.db_path)
    assert again.refresh(force=True) == 0
    assert again.search("gift card balance")[0].source == "gift-cards.md"
