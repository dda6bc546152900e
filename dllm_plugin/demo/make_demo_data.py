"""Regenerate chat_demo.jsonl: a small, deterministic instruction dataset for the demo.

Short factual questions with templated answers, so a 22M-parameter BERT can visibly
learn the answer format and many of the facts on a laptop CPU in a few minutes.
Run: python dllm_plugin/demo/make_demo_data.py
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Thailand": "Bangkok",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "India": "Delhi",
    "England": "London",
    "Belgium": "Brussels",
    "Hungary": "Budapest",
    "Denmark": "Copenhagen",
    "Argentina": "Buenos Aires",
    "Mexico": "Mexico City",
    "Australia": "Canberra",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "old": "young",
    "up": "down",
    "open": "closed",
    "early": "late",
    "strong": "weak",
    "rich": "poor",
    "wet": "dry",
    "hard": "soft",
    "loud": "quiet",
    "high": "low",
    "full": "empty",
    "long": "short",
    "clean": "dirty",
    "day": "night",
    "win": "lose",
    "love": "hate",
    "near": "far",
    "thick": "thin",
    "true": "false",
}
PLURALS = {
    "mouse": "mice",
    "child": "children",
    "man": "men",
    "woman": "women",
    "tooth": "teeth",
    "foot": "feet",
    "goose": "geese",
    "person": "people",
    "cat": "cats",
    "dog": "dogs",
    "box": "boxes",
    "city": "cities",
    "knife": "knives",
    "leaf": "leaves",
    "bus": "buses",
    "baby": "babies",
    "wolf": "wolves",
    "fish": "fish",
    "sheep": "sheep",
    "house": "houses",
}
ANIMAL_SOUNDS = {
    "cow": "moo",
    "dog": "woof",
    "cat": "meow",
    "duck": "quack",
    "sheep": "baa",
    "owl": "hoot",
    "lion": "roar",
    "snake": "hiss",
    "horse": "neigh",
    "pig": "oink",
    "bee": "buzz",
    "frog": "croak",
}
COLORS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "a banana": "yellow",
    "a strawberry": "red",
    "an orange": "orange",
    "chocolate": "brown",
    "a lemon": "yellow",
    "blood": "red",
    "milk": "white",
    "a carrot": "orange",
}
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
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
]


def rows(rng: random.Random) -> list[dict]:
    out = []
    for country, city in CAPITALS.items():
        out.append(
            {
                "instruction": f"What is the capital of {country}?",
                "input": "",
                "output": f"The capital of {country} is {city}.",
            }
        )
    for word, opposite in OPPOSITES.items():
        out.append(
            {
                "instruction": f"What is the opposite of {word}?",
                "input": "",
                "output": f"The opposite of {word} is {opposite}.",
            }
        )
    for word, plural in PLURALS.items():
        out.append(
            {
                "instruction": "Give the plural of the word.",
                "input": word,
                "output": f"The plural of {word} is {plural}.",
            }
        )
    for animal, sound in ANIMAL_SOUNDS.items():
        out.append(
            {
                "instruction": f"What sound does a {animal} make?",
                "input": "",
                "output": f"A {animal} says {sound}.",
            }
        )
    for thing, color in COLORS.items():
        out.append(
            {
                "instruction": f"What color is {thing}?",
                "input": "",
                "output": f"{thing[0].upper() + thing[1:]} is {color}.",
            }
        )
    for a in range(10):
        for b in range(10):
            out.append(
                {
                    "instruction": "Add the two numbers.",
                    "input": f"{a} + {b}",
                    "output": f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.",
                }
            )
    for n in range(len(NUMBER_WORDS) - 1):
        out.append(
            {
                "instruction": f"What number comes after {NUMBER_WORDS[n]}?",
                "input": "",
                "output": f"After {NUMBER_WORDS[n]} comes {NUMBER_WORDS[n + 1]}.",
            }
        )
    for i, month in enumerate(MONTHS):
        out.append(
            {
                "instruction": f"Which month comes after {month}?",
                "input": "",
                "output": f"The month after {month} is {MONTHS[(i + 1) % 12]}.",
            }
        )
    for i, day in enumerate(DAYS):
        out.append(
            {
                "instruction": f"Which day comes after {day}?",
                "input": "",
                "output": f"The day after {day} is {DAYS[(i + 1) % 7]}.",
            }
        )
    rng.shuffle(out)
    return out


if __name__ == "__main__":
    data = rows(random.Random(0))
    path = Path(__file__).with_name("chat_demo.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    print(f"wrote {len(data)} rows to {path}")
