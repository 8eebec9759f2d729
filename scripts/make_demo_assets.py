"""Regenerates the built-in demo's assets in ftengine/demo/: the instruction dataset, the
byte-level BPE tokenizer trained on it, the preference (DPO) dataset over the same facts, the GRPO
demo's arithmetic (warm-up rows and prompts), and the tiny Qwen2 config.

    python scripts/make_demo_assets.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "ftengine" / "demo"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Egypt": "Cairo", "Canada": "Ottawa", "Peru": "Lima", "Kenya": "Nairobi",
    "Norway": "Oslo", "Greece": "Athens", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin",
    "Chile": "Santiago", "Cuba": "Havana", "Finland": "Helsinki", "Sweden": "Stockholm", "Hungary": "Budapest",
    "Belgium": "Brussels", "Denmark": "Copenhagen", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Nepal": "Kathmandu",
    "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Turkey": "Ankara", "Australia": "Canberra",
    "India": "New Delhi",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night", "happy": "sad",
    "light": "dark", "open": "closed", "early": "late", "full": "empty", "old": "new", "hard": "soft",
    "loud": "quiet", "rich": "poor", "wet": "dry", "strong": "weak", "high": "low", "long": "short",
    "thick": "thin", "left": "right", "push": "pull", "win": "lose", "buy": "sell", "first": "last",
    "near": "far",
}
COLORS = {
    "the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
    "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow", "milk": "white", "a carrot": "orange",
    "a plum": "purple", "chocolate": "brown", "a lime": "green", "blood": "red", "the night sky": "black",
}
SOUNDS = {
    "a cow": "moo", "a dog": "woof", "a cat": "meow", "a duck": "quack", "a sheep": "baa",
    "a lion": "roar", "a pig": "oink", "an owl": "hoot", "a horse": "neigh", "a snake": "hiss",
    "a bee": "buzz", "a frog": "croak", "a rooster": "cock-a-doodle-doo", "a mouse": "squeak",
}
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "goose": "geese",
    "man": "men", "woman": "women", "person": "people", "leaf": "leaves", "knife": "knives",
    "wolf": "wolves", "box": "boxes", "city": "cities", "baby": "babies", "fish": "fish",
    "cactus": "cacti", "ox": "oxen", "sheep": "sheep", "life": "lives", "half": "halves",
}
NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
SYSTEMS = ["You are a helpful assistant.", "Answer in one short sentence."]


def rows() -> list[dict]:
    rng = random.Random(7)
    items = []
    for country, city in CAPITALS.items():
        items.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
    for word, opposite in OPPOSITES.items():
        items.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."))
    for thing, color in COLORS.items():
        items.append((f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {color}."))
    for animal, sound in SOUNDS.items():
        items.append((f"What sound does {animal} make?", f"{animal[0].upper() + animal[1:]} says {sound}."))
    for word, plural in PLURALS.items():
        items.append((f"What is the plural of {word}?", f"The plural of {word} is {plural}."))
    pairs = [(a, b) for a in range(1, 7) for b in range(1, 7)]
    rng.shuffle(pairs)
    for a, b in pairs[:30]:
        items.append((f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?",
                      f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}."))
    out = []
    for i, (question, answer) in enumerate(items):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if i % 5 == 0:
            messages.insert(0, {"role": "system", "content": SYSTEMS[i % 2]})
        out.append({"messages": messages})
    return out


def _wrong(rng: random.Random, right: str, choices: list[str]) -> str:
    return rng.choice([c for c in choices if c != right])


def _naive_plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def preference_rows() -> list[dict]:
    """The demo's facts as preference pairs: chosen = the right answer, rejected = a wrong one in
    the same words. Every fourth pair is written as message lists (with a system prompt every
    eighth), the others as strings, so both shapes of the preference format appear."""
    rng = random.Random(11)
    cities, colors, sounds = list(CAPITALS.values()), sorted(set(COLORS.values())), list(SOUNDS.values())
    opposites = list(OPPOSITES.values())
    triples = []
    for country, city in CAPITALS.items():
        triples.append((f"What is the capital of {country}?", f"The capital of {country} is {city}.",
                        f"The capital of {country} is {_wrong(rng, city, cities)}."))
    for word, opposite in OPPOSITES.items():
        triples.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}.",
                        f"The opposite of {word} is {_wrong(rng, opposite, opposites)}."))
    for thing, color in COLORS.items():
        subject = thing[0].upper() + thing[1:]
        triples.append((f"What color is {thing}?", f"{subject} is {color}.",
                        f"{subject} is {_wrong(rng, color, colors)}."))
    for animal, sound in SOUNDS.items():
        subject = animal[0].upper() + animal[1:]
        triples.append((f"What sound does {animal} make?", f"{subject} says {sound}.",
                        f"{subject} says {_wrong(rng, sound, sounds)}."))
    for word, plural in PLURALS.items():
        wrong = _naive_plural(word) if _naive_plural(word) != plural else word
        triples.append((f"What is the plural of {word}?", f"The plural of {word} is {plural}.",
                        f"The plural of {word} is {wrong}."))
    out = []
    for i, (question, chosen, rejected) in enumerate(triples):
        if i % 4:
            out.append({"prompt": question, "chosen": chosen, "rejected": rejected})
            continue
        prompt = [{"role": "user", "content": question}]
        if i % 8 == 0:
            prompt.insert(0, {"role": "system", "content": SYSTEMS[0]})
        out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]})
    return out


ARITHMETIC_SYSTEM = "Answer with the number only."
WARMUP_PROBLEMS = 60


def arithmetic_rows() -> tuple[list[dict], list[dict]]:
    """Every sum and difference of two digits whose answer is one digit (110 problems), shuffled: the
    first 60 with their answers are the GRPO demo's warm-up SFT rows, the other 50 its GRPO prompts
    (with the ``answer`` and ``format_pattern`` columns its rewards read)."""
    problems = [(f"What is {a} + {b}?", a + b) for a in range(10) for b in range(10) if a + b <= 9]
    problems += [(f"What is {a} - {b}?", a - b) for a in range(10) for b in range(a + 1)]
    random.Random(1).shuffle(problems)

    def prompt(question: str) -> list[dict]:
        return [{"role": "system", "content": ARITHMETIC_SYSTEM}, {"role": "user", "content": question}]

    warmup = [{"messages": prompt(q) + [{"role": "assistant", "content": str(a)}]}
              for q, a in problems[:WARMUP_PROBLEMS]]
    prompts = [{"messages": prompt(q), "answer": str(a), "format_pattern": "\\s*-?\\d+\\s*"}
               for q, a in problems[WARMUP_PROBLEMS:]]
    return warmup, prompts


def write_jsonl(path: Path, data: list[dict]) -> None:
    with path.open("w") as handle:
        for row in data:
            handle.write(json.dumps(row) + "\n")


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tokenizer(texts: list[str]) -> None:
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])
    fast.chat_template = CHATML
    fast.save_pretrained(str(DEMO / "tokenizer"))


def main() -> None:
    DEMO.mkdir(parents=True, exist_ok=True)
    data = rows()
    write_jsonl(DEMO / "data.jsonl", data)
    pairs = preference_rows()
    write_jsonl(DEMO / "preference.jsonl", pairs)
    warmup, prompts = arithmetic_rows()
    write_jsonl(DEMO / "arithmetic_warmup.jsonl", warmup)
    write_jsonl(DEMO / "arithmetic.jsonl", prompts)
    texts = [m["content"] for row in data for m in row["messages"]] + ["system user assistant"]
    tokenizer(texts * 4)
    print(f"{len(data)} rows and {len(pairs)} preference pairs written to {DEMO}")


if __name__ == "__main__":
    main()
