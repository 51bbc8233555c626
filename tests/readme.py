"""Code blocks of README.md, so that tests run the documentation as written."""

from __future__ import annotations

import json
import re
from typing import Any

from tests.processes import ROOT

README = ROOT / "README.md"


def fenced_block(language: str, containing: str) -> str:
    """The one ```language block of the README whose text contains `containing`."""
    blocks: list[str] = re.findall(rf"^```{language}\n(.*?)^```$", README.read_text(), re.M | re.S)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"{len(found)} ```{language} blocks of README.md contain {containing!r}"
    return found[0]


def heredoc(file_name: str) -> str:
    """What the README's `cat > file_name <<'EOF'` writes."""
    block = fenced_block("sh", f"cat > {file_name} <<'EOF'")
    match = re.search(rf"cat > {re.escape(file_name)} <<'EOF'\n(.*?)\nEOF\n", block, re.S)
    assert match, f"no here-document for {file_name} in README.md"
    return match.group(1) + "\n"


def street_ontology() -> dict[str, Any]:
    """The ontology of the README's worked example (section "Projects and ontologies")."""
    value: dict[str, Any] = json.loads(heredoc("street-ontology.json"))
    return value
