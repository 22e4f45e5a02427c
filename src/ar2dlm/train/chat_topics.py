"""The ``topics`` prompt source: chat requests built from a topic list and request forms.

The hand-written chat instructions are ~200 training prompts: too few for a drafter to learn how the model answers a
chat request (its acceptance on the bench's chat set stays near one token). These prompts are the model's own chat
data at scale: each of ``TOPICS`` (science, daily life, work, programming, maths, writing, history, ...) is asked in
``FORMS_PER_TOPIC`` of the ``FORMS`` (explain, list, compare, tips, a short poem, ...), picked by a generator seeded
with the topic, and the model answers them (``ar2dlm distill``).

Only a ``train`` split exists. A topic that shares a word of five or more letters with a ``bench`` chat
instruction is left out, so no benchmark request is paraphrased into training. Ids: ``topics/<nnn>/<form>``.
"""

from __future__ import annotations

import random
import re

FORMS_PER_TOPIC = 5

FORMS = {
    "explain": "Explain {t} in simple terms.",
    "ideas": "What are the main ideas behind {t}?",
    "tips": "Give me three practical tips about {t}.",
    "beginner": "Write a short paragraph about {t} for a beginner.",
    "mistakes": "What are common mistakes people make with {t}?",
    "facts": "List five interesting facts about {t}.",
    "child": "How would you explain {t} to a ten-year-old?",
    "poem": "Write a short poem about {t}.",
    "proscons": "What are the pros and cons of {t}?",
    "history": "Summarize the history of {t} in a few sentences.",
    "questions": "What questions should I ask to learn more about {t}?",
    "story": "Write a very short story that involves {t}.",
    "why": "Why does {t} matter?",
    "steps": "Describe the first steps for getting started with {t}.",
}

TOPICS = (
    # science and nature
    "black holes", "the water cycle", "plate tectonics", "volcanoes", "the immune system", "DNA", "gravity",
    "electricity", "magnetism", "the periodic table", "evolution", "coral reefs", "rainforests", "bird migration",
    "the moon's phases", "solar energy", "wind turbines", "recycling", "earthquakes", "hurricanes", "bacteria",
    "the human brain", "sound waves", "rainbows", "glaciers", "honey", "mushrooms", "tides", "comets", "atoms",
    # daily life
    "cooking rice", "baking bread", "making coffee", "house plants", "budgeting", "public transport",
    "cleaning a kitchen", "packing for a trip", "learning a new language", "running a first marathon",
    "staying hydrated", "morning routines", "time management", "writing a resume", "job interviews",
    "negotiating a salary", "buying a used car", "renting an apartment", "gardening tomatoes", "caring for a dog",
    "adopting a cat", "meditation", "journaling", "stretching", "camping", "hiking safety", "composting",
    "painting a room", "fixing a flat bicycle tire", "planning a wedding",
    # work and society
    "remote work", "team meetings", "public speaking", "customer service", "small businesses", "marketing",
    "supply chains", "inflation", "interest rates", "credit scores", "insurance", "elections", "libraries",
    "museums", "online privacy", "password managers", "social media", "volunteering", "urban planning",
    "electric cars",
    # programming and computing
    "Python lists", "Python dictionaries", "recursion", "binary search", "hash tables", "linked lists",
    "object-oriented programming", "unit testing", "debugging", "Git branches", "HTTP requests", "JSON",
    "regular expressions", "SQL indexes", "Linux file permissions", "Docker containers", "caching",
    "multithreading", "exceptions in Python", "list comprehensions", "sorting algorithms", "big-O notation",
    "REST APIs", "command-line tools", "code reviews", "type hints in Python", "memory leaks", "unicode",
    "encryption", "machine learning",
    # maths
    "fractions", "percentages", "prime numbers", "probability", "the Pythagorean theorem", "compound interest",
    "averages and medians", "negative numbers", "geometry of circles", "algebraic equations", "graphs of lines",
    "statistics", "logarithms", "unit conversion", "mental arithmetic",
    # writing and language
    "persuasive essays", "poetry", "short stories", "grammar", "punctuation", "synonyms", "writing emails",
    "writing a cover letter", "taking notes", "summarizing articles", "idioms", "storytelling", "book reviews",
    "haiku", "letters of thanks",
    # history and culture
    "ancient Egypt", "the Roman Empire", "the printing press", "the Renaissance", "the industrial revolution",
    "the first airplanes", "the space race", "the Silk Road", "the Olympic Games", "jazz music", "chess",
    "origami", "the invention of the telephone", "world maps", "national parks",
)


def records(bench_prompts: list[str]) -> list[tuple[str, str]]:
    """``(id, prompt)`` pairs, in a fixed order; topics sharing a long word with a bench prompt are left out."""
    bench_words = {w for text in bench_prompts for w in _words(text)}
    out = []
    for n, topic in enumerate(TOPICS):
        if _words(topic) & bench_words:
            continue
        forms = random.Random(f"topics/{topic}").sample(sorted(FORMS), FORMS_PER_TOPIC)
        out += [(f"topics/{n:03d}/{form}", FORMS[form].format(t=topic)) for form in forms]
    return out


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 5}
