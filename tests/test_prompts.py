"""Marked spans must land on the right tokens for any tokenizer, with and without a chat template."""

from __future__ import annotations

import pytest

import qktrace.model.testing as testing
from qktrace.core.prompts import (
    Prompt,
    PromptBuilder,
    filter_prompts,
    load_box_letters,
    load_categories,
    load_objects,
    locate,
    span_token,
)

_TOKENIZERS: dict[str, object] = {}


def tokenizer(style: str):
    if style not in _TOKENIZERS:
        _TOKENIZERS[style] = testing.tokenizer(style)
    return _TOKENIZERS[style]


def list_prompt(items: list[str], category: str) -> Prompt:
    b = PromptBuilder()
    for item in items:
        b.add("- ").add(item, "item").add("\n")
    b.add("What are the ").add(category, "category").add(" in the list?")
    return b.build(meta={"items": items})


def box_prompt(objects: list[str], letters: list[str], query: int) -> Prompt:
    b = PromptBuilder()
    for i, (obj, letter) in enumerate(zip(objects, letters, strict=True)):
        lead = "The " if i == 0 else (", and the " if i == len(objects) - 1 else ", the ")
        b.add(lead).add(obj, "object").add(" is in Box ").add(letter, "box")
    b.add(". Which box is the ").add(objects[query], "query_object").add(" in?")
    return b.build(answer_prefix="Box")


PROMPTS = [
    list_prompt(["polar bear", "apple", "New Jersey", "crème brûlée", "São Paulo"], "fruits"),
    list_prompt(["water", "x", "table tennis"], "sports"),
    box_prompt(["stone", "map", "key", "coin"], ["A", "Q", "Z", "B"], 2),
]


def stripped(tok, token_id: int) -> str:
    return tok.decode([token_id]).replace("▁", " ").strip()


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize("style", ["bpe", "metaspace"])
@pytest.mark.parametrize("which", ["last", "first"])
def test_every_span_lands_on_a_token_holding_its_edge(style, chat, which):
    tok = tokenizer(style)
    loc = locate(tok, PROMPTS, chat=chat, which=which)
    assert loc.chat is chat
    for i, prompt in enumerate(PROMPTS):
        assert loc.ids[i] == tok(loc.texts[i], add_special_tokens=not chat)["input_ids"]
        for name, spans in prompt.spans.items():
            positions = loc.positions[name][i]
            assert len(positions) == len(spans)
            for (start, end), pos in zip(spans, positions, strict=True):
                span_text = prompt.text[start:end]
                decoded = stripped(tok, loc.ids[i][pos])
                edge = span_text[-1] if which == "last" else span_text[0]
                # byte-level BPE may split an accented character over two tokens: compare bytes
                assert decoded and (edge in decoded or "\ufffd" in decoded), (
                    name,
                    span_text,
                    decoded,
                )
            assert positions == sorted(positions)
    # the span's token is the last (first) one overlapping it: nothing past it overlaps
    if which == "last":
        assert [len(p) for p in loc.positions["item"]] == [5, 3, 0]


@pytest.mark.parametrize("style", ["bpe", "metaspace"])
def test_chat_template_wraps_prompt_and_keeps_one_bos(style):
    tok = tokenizer(style)
    plain = locate(tok, PROMPTS, chat=False)
    chat = locate(tok, PROMPTS, chat=True)
    auto = locate(tok, PROMPTS)
    assert auto.ids == chat.ids
    for i in range(len(PROMPTS)):
        assert chat.ids[i].count(tok.bos_token_id) == 1 and chat.ids[i][0] == tok.bos_token_id
        assert plain.ids[i][0] == tok.bos_token_id
        assert "<|assistant|>" in chat.texts[i]
        # the same words are found, shifted by the template's preamble
        assert plain.span_tokens("item")[i] == chat.span_tokens("item")[i]
    # the boxes prompt ends with the answer prefix after the generation prompt
    assert chat.texts[2].endswith("<|assistant|>\nBox")
    assert plain.texts[2].endswith("in? Box")


def test_span_outside_text_names_prompt_and_span():
    bad = Prompt("The cat is in Box A", {"box": [(18, 19)], "object": [(30, 33)]})
    with pytest.raises(ValueError, match=r"Prompt 1 .*'object'"):
        locate(tokenizer("bpe"), [PROMPTS[0], bad], chat=False)


def test_span_dropped_by_normalizer_names_prompt_and_span_text():
    from tokenizers import normalizers

    tok = testing.tokenizer("metaspace")
    tok.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace("#", "")]
    )
    p = PromptBuilder().add("The ").add("#", "mark").add(" cat").build()
    with pytest.raises(ValueError, match=r"Prompt 0 \('The # cat'\): span 'mark' '#'"):
        locate(tok, [p], chat=False)


def test_template_that_rewrites_the_message_is_refused():
    tok = testing.tokenizer("bpe")
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(ValueError, match="Prompt 0 .*chat=False"):
        locate(tok, PROMPTS[:1], chat=True)


def test_chat_true_without_template_is_refused():
    tok = testing.tokenizer("bpe")
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        locate(tok, PROMPTS, chat=True)
    assert locate(tok, PROMPTS).chat is False


def test_builder_refuses_blank_span_and_span_token_rule():
    with pytest.raises(ValueError, match="no visible characters"):
        PromptBuilder().add("  ", "item")
    offsets = [(0, 0), (0, 4), (4, 9), (9, 10)]  # a special token, then three tokens
    assert span_token(offsets, 0, 1) == 1
    assert span_token(offsets, 3, 9) == 2
    assert span_token(offsets, 3, 9, which="first") == 1
    assert span_token(offsets, 10, 12) is None


def test_data_lists():
    categories = load_categories()
    paper = {"animal", "fruit", "liquid", "vehicle", "country"}
    more = {"sport", "bird", "fish", "city", "food", "US state"}
    assert paper | more <= set(categories)
    seen: dict[str, str] = {}
    for name, entry in categories.items():
        assert entry["plural"] and len(entry["items"]) >= 15, name
        for item in entry["items"]:
            assert item.lower() not in seen, (item, name, seen.get(item.lower()))
            seen[item.lower()] = name
    objects = load_objects()
    assert len(objects) >= 40 and len(set(objects)) == len(objects)
    assert load_box_letters() == [chr(c) for c in range(ord("A"), ord("Z") + 1)]


def test_library_builds_the_studies_prompts_and_never_imports_studies():
    """The prompt builders live in qktrace.core.prompts; studies re-export them (one source)."""
    import ast
    from pathlib import Path

    import qktrace
    from qktrace.core import prompts
    from qktrace.studies import binding, filter_heads

    assert binding.build_prompts is prompts.boxes_prompts
    assert binding.boxes_prompt is prompts.boxes_prompt
    assert filter_heads.build_prompts is prompts.filter_prompts
    assert filter_heads.QUESTIONS is prompts.FILTER_QUESTIONS
    a, b = prompts.boxes_prompts(4, 3, seed=5), prompts.boxes_prompts(4, 3, seed=5)
    assert [p.text for p in a] == [p.text for p in b]
    # the library does not depend on the studies (installed as qktrace.studies from studies/);
    # only the CLI (the entry point that runs them) names the studies' registry
    root = Path(qktrace.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "cli.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if any(n == "studies" or n.startswith("qktrace.studies.") for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, offenders


def test_filter_answer_lead_in_ends_the_prompt_with_the_answers_start():
    """The lead-in restates the question up to where the answer's first item starts, after the
    chat template's assistant turn; the study passes it through; off by default."""
    from qktrace.studies.filter_heads import filter_heads

    tok = tokenizer("bpe")
    plain = filter_prompts(6, seed=3)
    led = filter_prompts(6, seed=3, answer_lead_in=True)
    assert [p.text for p in led] == [p.text for p in plain]
    assert all(p.answer_prefix == "" for p in plain)
    want = {"all": "The {plural} in the list are:\n-", "first": "The first {singular} in the list is",
            "last": "The last {singular} in the list is"}  # fmt: skip
    plural = {c: v["plural"] for c, v in load_categories().items()}
    for p in led:
        asked = p.meta["asked"]
        lead = want[p.meta["question"]].format(plural=plural[asked], singular=asked)
        assert p.answer_prefix == lead
        assert locate(tok, [p], chat=True).texts[0].endswith(f"<|assistant|>\n{lead}")
    study = filter_heads(answer_lead_in=True)
    assert [p.answer_prefix for p in study.prompts(6, 3)] == [p.answer_prefix for p in led]
    assert study.option_values()["answer_lead_in"] is True
