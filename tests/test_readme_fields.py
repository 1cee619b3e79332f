"""The README's API field table is the field table: a field added, renamed or re-documented in
``units.fields`` without the README following fails here."""

import os
import re

from lib_identity import units as U

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _readme_table() -> str:
    text = open(README, encoding="utf-8").read()
    m = re.search(r"<!-- fields:[^\n]*-->\n(.*?)<!-- /fields -->", text, re.S)
    assert m, "README.md has no <!-- fields --> table"
    return m.group(1)


def test_readme_field_table_is_the_field_table():
    assert _readme_table() == U.field_table_markdown(), (
        "README.md's API field table differs from units.fields; paste the output of `python -m lib_identity fields`")


def test_every_api_field_has_one_row_in_table_order():
    names = re.findall(r"^\| `(\w+)` \|", _readme_table(), re.M)
    assert tuple(names) == U.API_FIELDS
    docs = U.field_docs()
    assert [d["name"] for d in docs] == list(U.API_FIELDS)
    assert all(d["accepts"] and d["help"] and d["methods"] for d in docs)
