"""The hub model cards in `model_cards/`: YAML front matter the hub reads, and Python examples that compile and import
only names that exist."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import yaml

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
PUBLISHED = ["IF-I-M", "IF-I-L", "IF-I-XL", "IF-II-M", "IF-II-L"]


def _front_matter(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "a card starts with YAML front matter between --- lines"
    return yaml.safe_load(match.group(1))


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("name", PUBLISHED)
def test_card_metadata(name):
    text = (CARDS / f"{name}.md").read_text()
    meta = _front_matter(text)
    assert meta["license"] == "deepfloyd-if-license" and meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "text-to-image" and meta["base_model"] == f"DeepFloyd/{name}-v1.0"
    assert "deepfloyd-if" in meta["tags"] and f"# {name} for if-diffusers" in text


def _check_example(block: str, card: str) -> None:
    """Compile `block` and import what it imports; AssertionError naming a name the package does not have."""
    tree = ast.parse(block)
    compile(tree, card, "exec")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"{card} imports {missing} from {node.module}, which has no such names"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


@pytest.mark.parametrize("card", sorted(p.name for p in CARDS.glob("*.md") if p.name != "README.md"))
def test_card_code_compiles_and_imports_what_exists(card):
    blocks = _python_blocks((CARDS / card).read_text())
    assert blocks, f"{card} has no Python usage example"
    for block in blocks:
        _check_example(block, card)


def test_the_example_check_catches_missing_names_and_syntax_errors():
    with pytest.raises(AssertionError, match="IFCascadeThatDoesNotExist"):
        _check_example("from if_diffusers import IFPipeline, IFCascadeThatDoesNotExist\n", "card.md")
    with pytest.raises(SyntaxError):
        _check_example("pipe = IFPipeline(\n", "card.md")
