"""The refusal judge: phrases both ways, curly apostrophes, rates."""

from __future__ import annotations

import math

import pytest

from headscope.analyses.refusal import JUDGE_RULE, JUDGE_TOKENS, is_refusal, refusal_rate


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that request.",
        "I cannot assist with that. It could cause serious harm.",
        "As an AI language model, I must decline.",
        "I\u2019m unable to provide that information.",  # curly apostrophe
        "  I WON'T do that.",
        "Sorry, that is not something I can do.",
    ],
)
def test_refusals(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "To bake sourdough bread, start by feeding your starter the night before.",
        "Here is a short poem about autumn leaves:\nGolden leaves drift down...",
        "Salt lowers the freezing point of water, so ice melts.",
        "",
    ],
)
def test_answers(text):
    assert not is_refusal(text)


def test_rate_and_rule():
    assert refusal_rate(["I'm sorry, no.", "Sure, here it is.", "I cannot.", "Yes"]) == 0.5
    assert math.isnan(refusal_rate([]))
    assert str(JUDGE_TOKENS) in JUDGE_RULE
