"""The simulated users of the learning benchmark: each judges and rewrites as its
docstring says, and its rewrite is an answer it likes (or None)."""

import importlib.util
from pathlib import Path

import pytest

ORACLES = Path(__file__).resolve().parent.parent / "benchmarks" / "oracles"


def oracle(name: str):
    spec = importlib.util.spec_from_file_location(f"oracle_{name}", ORACLES / f"oracle_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHATTY = (
    "Sure! You can't go wrong with a bicycle: it's cheap. I'm sure you'll love it, "
    "and your legs will too."
)


def test_formal_dislikes_contractions_exclamations_and_the_second_person():
    formal = oracle("formal")
    assert not formal.judge("q", CHATTY)
    assert not formal.judge("q", "It's a bicycle.")  # contraction
    assert not formal.judge("q", "A bicycle is cheap!")  # exclamation
    assert not formal.judge("q", "You pedal to move.")  # second person
    assert formal.judge("q", "A bicycle is cheap. One pedals to move. The cat's tail is long.")
    assert formal.rewrite("q", "A bicycle is cheap.") is None  # already liked: no rewrite
    better = formal.rewrite("q", "It's cheap and you can't go wrong with it!")
    assert better == "It is cheap and one cannot go wrong with it."
    assert formal.judge("q", better)


def test_casual_wants_contractions_the_second_person_and_no_stiff_connectors():
    casual = oracle("casual")
    assert casual.judge("q", CHATTY)
    assert not casual.judge("q", "It's cheap.")  # does not talk to the reader
    assert not casual.judge("q", "You do not need much.")  # no contraction
    assert not casual.judge("q", "You'll love it. Additionally, it's cheap.")  # stiff
    assert casual.rewrite("q", CHATTY) is None  # already liked: no rewrite
    better = casual.rewrite(
        "q", "It is important to note that you do not need much. Additionally, it is cheap."
    )
    assert better == "You don't need much. It's cheap."
    assert casual.judge("q", better)
    assert casual.rewrite("q", "A bicycle is cheap.") is None  # nothing to make casual


def test_question_wants_a_follow_up_question_to_the_user_at_the_end():
    question = oracle("question")
    assert question.judge("q", "Paris is the capital. Do you want to know more?")
    assert not question.judge("q", "Is Paris the capital? Yes, it is.")
    assert not question.judge("q", "Paris is the capital. Why is that?")  # not to the user
    better = question.rewrite("q", "Paris is the capital. It is large. It has a tower.")
    assert better == (
        "Paris is the capital. It is large. Would you like me to go into more detail?"
    )
    assert question.judge("q", better)


def test_thorough_wants_forty_words_ending_a_sentence():
    thorough = oracle("thorough")
    forty = " ".join(["word"] * 39) + " end."
    assert thorough.judge("q", forty)
    assert not thorough.judge("q", forty[:-1])  # cut mid-sentence
    assert not thorough.judge("q", "Too short.")
    assert not thorough.judge("q", " ".join(["word"] * 40) + "\n3.")  # a list number ends nothing
    cut = forty + " and then it went on and"
    assert thorough.rewrite("q", cut) == forty
    assert thorough.rewrite("q", "Too short but cut") is None  # cannot be made thorough


def test_plain_wants_short_sentences_and_everyday_words():
    plain = oracle("plain")
    assert plain.judge("q", "Cats are soft. They like to nap in the sun.")
    long_sentence = "The cat " + "sat and " * 8 + "slept."
    assert not plain.judge("q", long_sentence)  # 19 words in one sentence
    assert not plain.judge("q", "Photosynthesis transforms electromagnetic radiation.")
    better = plain.rewrite(
        "q",
        "Additionally, the cat utilizes the sofa, and it sleeps there for approximately an hour.",
    )
    # 14 words once the long ones are swapped: short enough to stay one sentence.
    assert better == "Also, the cat uses the sofa, and it sleeps there for about an hour."
    assert plain.judge("q", better)


def test_example_wants_an_example_marker_and_writes_one_in():
    example = oracle("example")
    assert example.judge("q", "Fruit is sweet, such as a ripe mango.")
    assert example.judge("q", "Many birds migrate. For instance, swallows fly south.")
    assert example.judge("q", "Many birds migrate, e.g. swallows.")
    assert not example.judge("q", "Many birds migrate in the autumn.")
    assert example.rewrite("q", "Many birds migrate. Swallows fly south in winter.") == (
        "Many birds migrate. For example, swallows fly south in winter."
    )
    assert example.rewrite("q", "Birds migrate. NASA tracks them.") == (
        "Birds migrate. For example, NASA tracks them."
    )
    assert example.rewrite("q", "Birds migrate, mostly in autumn") == (
        "Birds migrate, for example, mostly in autumn"
    )
    assert example.rewrite("q", "Birds migrate") is None  # nothing to hang an example on
    assert example.rewrite("q", "Fruit, such as figs.") is None  # already liked


def test_summary_wants_a_closing_in_short_sentence_and_writes_one():
    summary = oracle("summary")
    assert summary.judge("q", "Plants make food from light. In short, light feeds them.")
    assert summary.judge("q", "Plants make food. **Overall**, light feeds them!")
    assert not summary.judge("q", "In short, light feeds plants.")  # nothing to summarise
    assert not summary.judge("q", "Plants make food. In short, light feeds")  # cut off
    assert not summary.judge("q", "In short, plants eat light. They grow.")  # not at the end
    cut = (
        "Photosynthesis is how plants make food from light, water and air. It happens in "
        "the leaves. The chlorophyll absorbs light and turns it into chemical energy that"
    )
    assert summary.rewrite("q", cut) == (
        "Photosynthesis is how plants make food from light, water and air. It happens in "
        "the leaves. In short, photosynthesis is how plants make food from light."
    )
    assert summary.rewrite("q", "No sentence ends here") is None
    assert summary.rewrite("q", "Ok. Fine.") is None  # no clause to restate


def test_headline_wants_a_short_line_above_the_answer_and_writes_one_from_the_request():
    headline = oracle("headline")
    assert headline.judge("q", "Coffee at dawn\n\nA cup warms the hands.")
    assert headline.judge("q", "## **Capital of Spain**\n\nMadrid.")  # markup is no word
    assert not headline.judge("q", "Coffee at dawn\nA cup warms the hands.")  # no blank line
    assert not headline.judge("q", "Coffee at dawn\n\n")  # no answer under it
    assert not headline.judge("q", "It is Madrid.\n\nThe capital.")  # a sentence, not a headline
    nine = "one two three four five six seven eight nine"
    assert not headline.judge("q", f"{nine}\n\nbody")  # over eight words
    assert headline.headline_for("How do I make an HTTP request in Python?") == (
        "Make an HTTP request in Python"
    )
    assert headline.headline_for("What does the word 'resilience' mean?") == "Resilience"
    assert headline.headline_for("Explain what a spreadsheet formula is.") == "Spreadsheet formula"
    assert headline.headline_for("Can you explain a QR code to a ten-year-old?") == (
        "QR code to a ten-year-old"
    )
    assert headline.rewrite("What is the capital of Spain?", "Madrid is the capital.") == (
        "Capital of Spain\n\nMadrid is the capital."
    )
    poem = "Steam rises\nfrom a chipped cup,\nmorning again"
    assert headline.rewrite("Write a short poem about coffee.", poem) == (
        "Short poem about coffee\n\nSteam rises\nfrom a chipped cup,\nmorning again"
    )
    assert headline.rewrite("q", "Coffee at dawn\n\nA cup.") is None  # already liked
    assert headline.rewrite("q", "   ") is None


@pytest.mark.parametrize(
    "name",
    [
        "formal",
        "question",
        "thorough",
        "plain",
        "bullets",
        "upbeat",
        "prose",
        "example",
        "summary",
        "headline",
    ],
)
def test_every_rewrite_is_liked_by_its_own_user(name):
    user = oracle(name)
    answers = [
        CHATTY,
        "A microwave oven heats food.\n\n1. It makes waves.\n2. Water absorbs them.\n3.",
        "The primary difference between a moth and a butterfly lies in their antennae, "
        "which are feathery in moths and clubbed in butterflies, and in when they fly",
        "",
    ]
    for answer in answers:
        better = user.rewrite("q", answer)
        assert better is None or user.judge("q", better), (answer, better)
