"""The demo model's synthetic fork/join task: add eight 2-digit numbers.

The four pairwise sums are independent, so the solution forks into four paths that
do the column-wise carry arithmetic side by side; the conclusion sees all of them
and adds their results, column by column. Written in the Multiverse grammar, with
the default ``Multiverse()`` headers, then a final answer line::

    38+27+91+45+62+19+73+56=?
    <Parallel><Goal><Outline>1: 38+27</Outline><Outline>2: 91+45</Outline>…</Goal>
    <Path>
    1: 38+27
    8+7=15
    3+2=5+1=6
    so 38+27=65</Path>
    <Path>
    2: 91+45
    …
    so 73+56=129</Path>
    <Conclusion>
    65+136+81+129
    5+6=11+1=12+9=21
    6+3=9+8=17+2=19+2=21
    0+1=1+0=1+1=2+2=4</Conclusion></Parallel>
    Answer: 411

Each line adds one digit column, right to left, as a running sum: the column's
digits (0 where a number is shorter), then the carry (the tens of the line before)
when it is not zero; the result's digits are the last line's sum followed by the
ones digits of the lines above it.

Only the paths run in parallel, so the critical path (outline, the longest path,
conclusion: ~163 tokens) is about 0.57x the ~286 tokens of writing the same text as
one thread.

A ``Solution`` keeps the parts each thread writes (``main``: the outline, up to
``</Goal>``; ``paths``: each child's text after its injected header;
``conclusion``: the continuation after the injected join header), so the same text
serves the thread tree and the sequential serialization (``Solution.sequential``).
Problems are split deterministically into train and held-out sets (``is_held_out``),
so evaluation never sees a training problem.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .protocols.tagged import Multiverse

TAGS = ("<Parallel>", "</Parallel>", "<Goal>", "</Goal>", "<Outline>", "</Outline>",
        "<Path>", "</Path>", "<Conclusion>", "</Conclusion>")
EOS = "<|endoftext|>"
PATH_HEADER = Multiverse.DEFAULT_TAGS.path_header     # "\n<Path>\n{num}:"
JOIN_HEADER = Multiverse.DEFAULT_TAGS.join_header     # "\n<Conclusion>\n"
NUMBERS, LOW, HIGH = 8, 10, 99                        # eight 2-digit operands, summed in pairs
_ANSWER = re.compile(r"Answer: (\d+)\s*$")


@dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return "+".join(map(str, self.numbers)) + "=?\n"

    @property
    def pairs(self) -> list[tuple[int, int]]:
        n = self.numbers
        return [(n[i], n[i + 1]) for i in range(0, len(n), 2)]

    @property
    def answer(self) -> int:
        return sum(self.numbers)


@dataclass(frozen=True)
class Solution:
    main: str               # sampled by the main thread: <Parallel><Goal>…</Goal>
    paths: tuple[str, ...]  # sampled by path i after its header; ends with </Path>
    conclusion: str         # sampled after the join header; ends with the answer line

    @property
    def path_headers(self) -> list[str]:
        return [PATH_HEADER.format(num=i + 1, i=i + 1) for i in range(len(self.paths))]

    def sequential(self) -> str:
        """The whole solution as one thread writes it (headers included, EOS not)."""
        return self.main + "".join(h + p for h, p in zip(self.path_headers, self.paths)) + \
            JOIN_HEADER + self.conclusion


def is_held_out(numbers: tuple[int, ...]) -> bool:
    """One problem in ten is held out from training (a fixed arithmetic hash)."""
    h = 0
    for x in numbers:
        h = (h * 1009 + x) % 1_000_003
    return h % 10 == 0


def draw(rng: random.Random, held_out: bool) -> Problem:
    while True:
        nums = tuple(rng.randint(LOW, HIGH) for _ in range(NUMBERS))
        if is_held_out(nums) == held_out:
            return Problem(nums)


def make_problems(n: int, seed: int, held_out: bool = True) -> list[Problem]:
    """``n`` problems drawn with ``seed`` from the held-out (default) or training split."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1.")
    # (random.Random takes |seed| of an int: a negative seed gets its own draw)
    rng = random.Random(seed if seed >= 0 else f"negative seed {seed}")
    return [draw(rng, held_out) for _ in range(n)]


def column_addition(nums: list[int]) -> str:
    """One line per digit column, right to left: one digit of every number (0 where a
    shorter number has none), then the carry from the column before (when not zero),
    added as a running sum (``6+0=6+1=7+6=13``: every step adds one digit to the sum
    just written)."""
    width = max(len(str(x)) for x in nums)
    rev = [str(x).zfill(width)[::-1] for x in nums]  # a missing digit is written as 0
    lines, carry = [], 0
    for i in range(width):
        terms = [int(r[i]) for r in rev] + ([carry] if carry else [])
        line, s = str(terms[0]), terms[0]
        for t in terms[1:]:
            s += t
            line += f"+{t}={s}"
        if len(terms) == 1:
            line += f"={s}"
        carry = s // 10
        lines.append(line)
    return "\n".join(lines)


def solve(p: Problem) -> Solution:
    outline = "".join(f"<Outline>{i + 1}: {x}+{y}</Outline>" for i, (x, y) in enumerate(p.pairs))
    paths = tuple(f" {x}+{y}\n{column_addition([x, y])}\nso {x}+{y}={x + y}</Path>"
                  for x, y in p.pairs)
    sums = [x + y for x, y in p.pairs]
    conclusion = (f"{'+'.join(map(str, sums))}\n{column_addition(sums)}</Conclusion></Parallel>\n"
                  f"Answer: {p.answer}")
    return Solution(f"<Parallel><Goal>{outline}</Goal>", paths, conclusion)


def parse_answer(text: str) -> int | None:
    """The number on the final ``Answer: N`` line (EOS and tags around it allowed)."""
    m = _ANSWER.search(text.replace(EOS, ""))
    return int(m.group(1)) if m else None


def check(p: Problem, text: str) -> bool:
    """Exact check: the text ends with the answer line and its number is the sum."""
    return parse_answer(text) == p.answer
