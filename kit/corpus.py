"""Deterministic templated English corpus: the general mix the kit's base models learn.

A small consistent world (capitals, colours, animals, days, numbers, people with simple
stories) written out through many templates, plus arithmetic and question/answer pairs. A tiny
model learns the facts and formats within minutes, so its continuations look alive. Only
`random.Random` with a fixed seed is used (its integer and choice algorithms are stable across
Python versions and platforms), so every machine generates the same text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

CAPITALS = {
    "France": "Paris",
    "Spain": "Madrid",
    "Italy": "Rome",
    "Germany": "Berlin",
    "England": "London",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Egypt": "Cairo",
    "Russia": "Moscow",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Canada": "Ottawa",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "India": "New Delhi",
}
THING_COLOURS = {
    "the sky": "blue",
    "the sea": "blue",
    "grass": "green",
    "a leaf": "green",
    "snow": "white",
    "milk": "white",
    "the sun": "yellow",
    "a banana": "yellow",
    "a lemon": "yellow",
    "coal": "black",
    "the night": "black",
    "a tomato": "red",
    "a strawberry": "red",
    "an orange": "orange",
    "a carrot": "orange",
    "chocolate": "brown",
    "a plum": "purple",
}
ANIMAL_SOUNDS = {
    "cow": "moo",
    "dog": "woof",
    "cat": "meow",
    "duck": "quack",
    "sheep": "baa",
    "lion": "roar",
    "owl": "hoot",
    "pig": "oink",
    "horse": "neigh",
}
ANIMAL_LEGS = {
    "dog": 4,
    "cat": 4,
    "cow": 4,
    "horse": 4,
    "bird": 2,
    "duck": 2,
    "spider": 8,
    "ant": 6,
    "bee": 6,
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "day": "night",
    "fast": "slow",
    "happy": "sad",
    "old": "young",
    "open": "closed",
    "light": "dark",
    "wet": "dry",
    "early": "late",
    "full": "empty",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
]  # fmt: skip
PEOPLE = {
    "Anna": "she",
    "Maria": "she",
    "Lucy": "she",
    "Emma": "she",
    "Mia": "she",
    "Sara": "she",
    "Tom": "he",
    "Ben": "he",
    "Sam": "he",
    "Jack": "he",
    "Leo": "he",
    "Max": "he",
    "Nina": "she",
    "Rosa": "she",
    "Clara": "she",
    "Hugo": "he",
    "Oscar": "he",
    "Pablo": "he",
}
JOBS = [
    "baker", "nurse", "teacher", "pilot", "farmer", "doctor", "painter", "chef", "driver",
    "singer", "writer", "dentist", "builder", "sailor", "gardener", "tailor",
]  # fmt: skip
PLACES = ["the park", "the market", "the school", "the beach", "the library", "the farm", "the zoo"]
OBJECTS = ["apples", "books", "balls", "flowers", "pencils", "cookies", "cards", "shells"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown"]
COLOURED_THINGS = ["ball", "hat", "bike", "kite", "cup", "bag", "car", "coat"]

Template = Callable[[random.Random], str]


def _capital_fact(rng: random.Random) -> str:
    country = rng.choice(list(CAPITALS))
    city = CAPITALS[country]
    return rng.choice(
        [
            f"The capital of {country} is {city}.",
            f"{city} is the capital of {country}.",
            f"{city} is a city in {country}.",
            f"Q: What is the capital of {country}? A: {city}.",
            f"Q: What is the capital of {country}? A: The capital of {country} is {city}.",
            f"Q: Which country is {city} in? A: {city} is in {country}.",
        ]
    )


def _colour_fact(rng: random.Random) -> str:
    thing = rng.choice(list(THING_COLOURS))
    colour = THING_COLOURS[thing]
    return rng.choice(
        [
            f"{_capitalised(thing)} is {colour}.",
            f"The colour of {thing} is {colour}.",
            f"Q: What colour is {thing}? A: {_capitalised(thing)} is {colour}.",
            f"Q: What colour is {thing}? A: {_capitalised(colour)}.",
        ]
    )


def _animal_fact(rng: random.Random) -> str:
    if rng.random() < 0.5:
        animal = rng.choice(list(ANIMAL_SOUNDS))
        sound = ANIMAL_SOUNDS[animal]
        return rng.choice(
            [
                f"A {animal} says {sound}.",
                f"Q: What does a {animal} say? A: A {animal} says {sound}.",
                f"The {animal} says {sound} {sound}.",
            ]
        )
    animal = rng.choice(list(ANIMAL_LEGS))
    legs = ANIMAL_LEGS[animal]
    return rng.choice(
        [
            f"A {animal} has {NUMBER_WORDS[legs]} legs.",
            f"Q: How many legs does a {animal} have? A: {legs}.",
            f"Q: How many legs does a {animal} have? A: A {animal} has {NUMBER_WORDS[legs]} legs.",
        ]
    )


def _opposite_fact(rng: random.Random) -> str:
    word, opposite = rng.choice(list(OPPOSITES.items()))
    if rng.random() < 0.5:
        word, opposite = opposite, word
    return rng.choice(
        [
            f"The opposite of {word} is {opposite}.",
            f"Q: What is the opposite of {word}? A: {_capitalised(opposite)}.",
        ]
    )


def _calendar_fact(rng: random.Random) -> str:
    if rng.random() < 0.7:
        names, kind = DAYS, "day"
        sequence = "Today is {current}. Tomorrow is {following}. Yesterday was {previous}."
    else:
        names, kind = MONTHS, "month"
        sequence = "This month is {current}. Next month is {following}. Last month was {previous}."
    i = rng.randrange(len(names))
    current, following = names[i], names[(i + 1) % len(names)]
    previous = names[i - 1]
    return rng.choice(
        [
            f"The {kind} after {current} is {following}.",
            f"The {kind} before {current} is {previous}.",
            f"Q: What {kind} comes after {current}? A: {following}.",
            f"Q: What {kind} comes before {current}? A: {previous}.",
            sequence.format(current=current, following=following, previous=previous),
            f"The {kind}s are {', '.join(names)}.",
        ]
    )


def _arithmetic(rng: random.Random) -> str:
    # Small operands: a few hundred facts, each seen often enough to be learned in minutes.
    if rng.random() < 0.6:
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        question, answer, operation = f"{a} + {b}", a + b, "plus"
    else:
        a = rng.randint(0, 10)
        b = rng.randint(0, a)
        question, answer, operation = f"{a} - {b}", a - b, "minus"
    in_words = f"{_capitalised(NUMBER_WORDS[a])} {operation} {NUMBER_WORDS[b]} is {answer}."
    return rng.choice(
        [
            f"{question} = {answer}",
            f"Q: What is {question}? A: {answer}.",
            f"Q: What is {question}? A: {answer}.",
            in_words,
        ]
    )


def _counting(rng: random.Random) -> str:
    start = rng.randint(0, 15)
    stop = start + rng.randint(3, 10)
    numbers = ", ".join(str(n) for n in range(start, stop + 1))
    down = ", ".join(str(n) for n in range(stop, start - 1, -1))
    name = rng.choice(list(PEOPLE))
    return rng.choice(
        [
            f"Count from {start} to {stop}: {numbers}.",
            f"Count down from {stop} to {start}: {down}.",
            f"{name} counts: {numbers}.",
            f"{numbers}",
            f"Q: What number comes after {start}? A: {start + 1}.",
            f"Q: What number comes before {stop}? A: {stop - 1}.",
        ]
    )


def _person_home(rng: random.Random) -> str:
    name = rng.choice(list(PEOPLE))
    country = rng.choice(list(CAPITALS))
    city = CAPITALS[country]
    pronoun = PEOPLE[name]
    return rng.choice(
        [
            f"{name} lives in {city}, the capital of {country}.",
            f"{name} lives in {city}. {_capitalised(pronoun)} likes {country} very much.",
            f"{name} lives in {city}. Q: Where does {name} live? A: {name} lives in {city}.",
            f"{name} lives in {city}. Q: Which country does {name} live in? A: {country}.",
        ]
    )


def _person_job(rng: random.Random) -> str:
    # The words of the record task (names, ages, jobs, cities), in plain sentences only.
    name, job = rng.choice(list(PEOPLE)), rng.choice(JOBS)
    city = rng.choice(list(CAPITALS.values()))
    pronoun = _capitalised(PEOPLE[name])
    return rng.choice(
        [
            f"{name} is a {job}. {pronoun} lives in {city}.",
            f"{name} works as a {job}.",
            f"{name} is {rng.randint(18, 90)} years old.",
            f"The {job} lives in {city}.",
            f"Q: What does {name} do? A: {name} is a {job}.",
        ]
    )


def _shopping_story(rng: random.Random) -> str:
    name, other = rng.sample(list(PEOPLE), 2)
    pronoun = _capitalised(PEOPLE[name])
    things = rng.choice(OBJECTS)
    have, change = rng.randint(2, 12), rng.randint(1, 8)
    if rng.random() < 0.5:
        return (
            f"{name} has {have} {things}. {pronoun} gets {change} more. "
            f"Now {name} has {have + change} {things}."
        )
    change = min(change, have)
    return (
        f"{name} has {have} {things}. {pronoun} gives {change} to {other}. "
        f"Now {name} has {have - change} {things}."
    )


def _outing_story(rng: random.Random) -> str:
    name, other = rng.sample(list(PEOPLE), 2)
    day, place = rng.choice(DAYS), rng.choice(PLACES)
    colour, thing = rng.choice(COLOURS), rng.choice(COLOURED_THINGS)
    pronoun = _capitalised(PEOPLE[name])
    return rng.choice(
        [
            f"On {day}, {name} went to {place} with {other}. They saw a {colour} {thing}.",
            f"{name} likes the colour {colour}. {pronoun} has a {colour} {thing}.",
            f"{name} has a {colour} {thing}. Q: What colour is the {thing}? A: It is {colour}.",
            f"On {day}, {name} and {other} played at {place}. It was a happy day.",
        ]
    )


def _dialogue(rng: random.Random) -> str:
    turns = [rng.choice(_QUESTION_TEMPLATES)(rng) for _ in range(rng.randint(2, 4))]
    return "\n".join(turns)


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


_QUESTION_TEMPLATES: list[Template] = [
    _capital_fact,
    _colour_fact,
    _animal_fact,
    _opposite_fact,
    _calendar_fact,
    _arithmetic,
]
# (template, weight): arithmetic and capitals weigh most, they are the demo's prompts.
_WEIGHTED_TEMPLATES: list[tuple[Template, float]] = [
    (_capital_fact, 3.0),
    (_arithmetic, 8.0),
    (_colour_fact, 1.5),
    (_animal_fact, 1.5),
    (_opposite_fact, 1.0),
    (_calendar_fact, 1.5),
    (_counting, 1.5),
    (_person_home, 1.5),
    (_person_job, 1.5),
    (_shopping_story, 1.5),
    (_outing_story, 1.5),
    (_dialogue, 2.0),
]


def iter_documents(seed: int) -> Iterator[str]:
    """Yield an endless, seed-determined stream of short English documents."""
    rng = random.Random(seed)
    templates = [template for template, _ in _WEIGHTED_TEMPLATES]
    weights = [weight for _, weight in _WEIGHTED_TEMPLATES]
    while True:
        (template,) = rng.choices(templates, weights)
        yield template(rng)
