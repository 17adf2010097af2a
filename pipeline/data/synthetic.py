"""Synthetic multi-step arithmetic tasks in GSM8k-Aug line format, with seeded, disjoint splits.

    latent-make-task --task chain --out data/chain          # train.txt, valid.txt, test.txt, task.json, tokenizer/
    python -m pipeline.data.synthetic --task chain --out DIR --train 20000 --valid 300 --test 300

Why these tasks: a chain of k dependent calculator steps (each step uses the previous result) is
hard to compose in one forward pass of a small model, but easy when each intermediate result is
written down (CoT) or carried in a latent. That is the shape of the papers' claims, at a scale a
2-core CPU trains in minutes.

Each problem is a word problem whose steps are GSM8k-Aug annotations `<<a+b=c>>`, one per step,
so every reader, method and the evaluation harness treat it like GSM8k-Aug. Problems are
identified by their numbers and operations (not their wording): the splits never share a problem,
even in other words. Everything is a pure function of (task, sizes, seed).

Tasks (TASKS): `chain` (the study's task: 3–5 steps of +/− 1–9 and ×2/×3 on one quantity, every
value in [1, 30]); `stock` (the held-out check of issue 13: a shop's stock, 2–6 steps of +/− 1–12,
×2/×3 and exact ÷2/÷3, values in [1, 40]).
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

NAMES = ("Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena", "Milo",
         "Nora", "Omar", "Pia", "Quin", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wes", "Yara", "Zoe")
ITEMS = ("apples", "marbles", "stickers", "coins", "pencils", "shells", "cards", "beads", "stamps", "books")


@dataclass(frozen=True)
class Problem:
    question: str
    steps: tuple[str, ...]      # "<<a+b=c>>" each
    answer: int
    key: tuple                  # numbers and operations: what makes two problems the same

    def line(self) -> str:
        """The GSM8k-Aug line: `question||<<…>> <<…>> #### answer`."""
        return f"{self.question}||{' '.join(self.steps)} #### {self.answer}"


# --------------------------------------------------------------------------- task: chain

_CHAIN_START = ("{name} has {a} {item}.", "There are {a} {item} in {name}'s box.",
                "{name} starts the day with {a} {item}.")
_CHAIN_ADD = ("{name} buys {k} more.", "Then {name} finds {k} more {item}.", "A friend gives {name} {k} {item}.")
_CHAIN_SUB = ("{name} gives away {k}.", "Then {name} loses {k} {item}.", "{name} uses {k} of them.")
_CHAIN_MUL = {2: ("Then the number of {item} doubles.", "{name} ends up with twice as many."),
              3: ("Then the number of {item} triples.", "{name} ends up with three times as many.")}
_CHAIN_ASK = ("How many {item} does {name} have now?", "How many {item} are left in the end?")


def _chain(rng: random.Random, min_steps: int = 3, max_steps: int = 5, cap: int = 30, max_operand: int = 9) -> Problem:
    """One quantity changed step by step: + and − of 1–9, ×2 or ×3; every value stays in [1, cap].

    Small numbers keep each step a lookup a tiny model learns in minutes (so CoT-SFT is strong on a
    CPU budget), while composing 3–5 of them in one forward pass stays hard (No-CoT is weak).
    """
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, 20)
    fill = {"name": name, "item": item}
    sentences = [rng.choice(_CHAIN_START).format(a=value, **fill)]
    steps, key = [], [value]
    for _ in range(rng.randint(min_steps, max_steps)):
        options = [op for op, ok in (("add", value < cap), ("sub", value > 1), ("mul", value * 2 <= cap)) if ok]
        op = rng.choice(options)
        if op == "add":
            k = rng.randint(1, min(max_operand, cap - value))
            result, text, sym = value + k, rng.choice(_CHAIN_ADD), "+"
        elif op == "sub":
            k = rng.randint(1, min(max_operand, value - 1))
            result, text, sym = value - k, rng.choice(_CHAIN_SUB), "-"
        else:
            k = 3 if value * 3 <= cap and rng.random() < 0.4 else 2
            result, text, sym = value * k, rng.choice(_CHAIN_MUL[k]), "*"
        sentences.append(text.format(k=k, **fill))
        steps.append(f"<<{value}{sym}{k}={result}>>")
        key.append((sym, k))
        value = result
    sentences.append(rng.choice(_CHAIN_ASK).format(**fill))
    return Problem(" ".join(sentences), tuple(steps), value, tuple(key))


# --------------------------------------------------------------------------- task: stock

# Issue 13's second task, written after the study's recipe was fixed and never used to choose it:
# other wording (a shop's stock, not a person's belongings), 2–6 steps, other operations
# (halving and thirds besides + − × ; operands up to 12) and values up to 40.
_STOCK_GOODS = ("boxes of tea", "bags of rice", "jars of honey", "crates of pears", "rolls of tape", "packs of gum",
                "bottles of oil", "cans of paint", "loaves of bread", "cartons of milk")
_STOCK_SHOPS = ("the corner shop", "the market stall", "the school kiosk", "the village store", "the bakery",
                "the hardware store")
_STOCK_START = ("{shop} has {a} {goods} in stock.", "At opening time {shop} counts {a} {goods}.",
                "The shelf at {shop} holds {a} {goods}.")
_STOCK_OPS = {
    "+": ("A delivery brings {k} more.", "The owner unpacks another {k}.", "A supplier drops off {k} extra."),
    "-": ("Customers buy {k} of them.", "{k} are sold before lunch.", "The owner returns {k} to the supplier."),
    "*2": ("An order doubles the stock.", "The stock is doubled by a big delivery."),
    "*3": ("A large shipment makes the stock three times bigger.", "The stock triples overnight."),
    "/2": ("Half of the stock is moved to the storeroom.", "The owner sells exactly half of them."),
    "/3": ("Only a third of the stock is kept; the rest is donated.", "Two thirds of them are sent to another branch."),
}
_STOCK_ASK = ("How many {goods} does {shop} have at closing time?", "How many {goods} are in stock at the end?")


def _stock(rng: random.Random, min_steps: int = 2, max_steps: int = 6, cap: int = 40, max_operand: int = 12) -> Problem:
    """A shop's stock changed step by step: + and − of 1–12, ×2/×3, ÷2/÷3 (exact); values in [1, cap]."""
    goods, shop = rng.choice(_STOCK_GOODS), rng.choice(_STOCK_SHOPS)
    value = rng.randint(2, 24)
    sentences = [rng.choice(_STOCK_START).format(a=value, shop=shop, goods=goods).capitalize()]
    steps, key = [], [value]
    for _ in range(rng.randint(min_steps, max_steps)):
        allowed = {"+": value < cap, "-": value > 1, "*2": 2 * value <= cap, "*3": 3 * value <= cap,
                   "/2": value % 2 == 0, "/3": value % 3 == 0}
        op = rng.choice([o for o, ok in allowed.items() if ok])
        if op in "+-":
            k = rng.randint(1, min(max_operand, cap - value if op == "+" else value - 1))
            result = value + k if op == "+" else value - k
        else:
            k = int(op[1])
            result = value * k if op[0] == "*" else value // k
        sentences.append(rng.choice(_STOCK_OPS[op]).format(k=k))
        steps.append(f"<<{value}{op[0]}{k}={result}>>")
        key.append((op[0], k))
        value = result
    sentences.append(rng.choice(_STOCK_ASK).format(shop=shop, goods=goods))
    return Problem(" ".join(sentences), tuple(steps), value, tuple(key))


@dataclass(frozen=True)
class TaskShape:
    """What a task's problems look like: the number of steps and the largest value (tests read it)."""
    min_steps: int
    max_steps: int
    cap: int


TASKS = {"chain": _chain, "stock": _stock}
SHAPES = {"chain": TaskShape(3, 5, 30), "stock": TaskShape(2, 6, 40)}


# --------------------------------------------------------------------------- splits

@dataclass(frozen=True)
class TaskSpec:
    task: str = "chain"
    train: int = 20000
    valid: int = 300
    test: int = 300
    seed: int = 0


def generate(spec: TaskSpec) -> dict[str, list[Problem]]:
    """{"train", "valid", "test"} problem lists: distinct problems (by numbers and operations),
    so no split shares a problem with another. Raises if the task cannot yield enough."""
    if spec.task not in TASKS:
        raise ValueError(f"task: unknown {spec.task!r}; choose one of {', '.join(TASKS)}")
    make, rng = TASKS[spec.task], random.Random(f"{spec.task}:{spec.seed}")
    wanted = spec.train + spec.valid + spec.test
    seen, pool, tries = set(), [], 0
    while len(pool) < wanted:
        tries += 1
        if tries > 50 * wanted:
            raise ValueError(f"task {spec.task}: only {len(pool)} distinct problems after {tries} draws")
        problem = make(rng)
        if problem.key not in seen:
            seen.add(problem.key)
            pool.append(problem)
    # Evaluation splits first, so growing `train` never changes valid/test.
    return {"valid": pool[: spec.valid], "test": pool[spec.valid: spec.valid + spec.test],
            "train": pool[spec.valid + spec.test:]}


def write_task(spec: TaskSpec, out: str | Path) -> Path:
    """Write train.txt, valid.txt, test.txt (GSM8k-Aug lines) and task.json into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = generate(spec)
    for name, problems in splits.items():
        (out / f"{name}.txt").write_text("".join(p.line() + "\n" for p in problems), encoding="utf-8")
    (out / "task.json").write_text(json.dumps({**asdict(spec), "generator": "pipeline.data.synthetic"}, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="latent-make-task", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="chain", choices=sorted(TASKS))
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=TaskSpec.train)
    p.add_argument("--valid", type=int, default=TaskSpec.valid)
    p.add_argument("--test", type=int, default=TaskSpec.test)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tokenizer", action="store_true",
                   help="skip OUT/tokenizer (the 1000-token BPE of the training text the study's recipes use)")
    a = p.parse_args(argv)
    path = write_task(TaskSpec(a.task, a.train, a.valid, a.test, a.seed), a.out)
    print(f"wrote {path}/train.txt, valid.txt, test.txt ({a.train}/{a.valid}/{a.test} problems, task {a.task})")
    if not a.no_tokenizer:
        from pipeline.tokenizer_build import TASK_VOCAB_SIZE, build_tokenizer, file_texts

        build_tokenizer(file_texts(path / "train.txt"), path / "tokenizer", vocab_size=TASK_VOCAB_SIZE)
        print(f"wrote {path}/tokenizer (byte-level BPE, {TASK_VOCAB_SIZE} tokens, trained on train.txt)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
