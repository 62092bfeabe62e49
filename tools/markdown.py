"""Generated sections of Markdown pages: the tables that tools write into README.md and docs/."""

import pathlib


def replace_section(page, name: str, body: str):
    """Replaces the text between <!-- name:begin --> and <!-- name:end --> in `page` with body."""
    page = pathlib.Path(page)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = page.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{page} has no {begin} ... {end} section.")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{begin}\n{body}\n{end}{tail}")
