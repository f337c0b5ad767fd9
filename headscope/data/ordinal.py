"""The ordinal sequences: the ``ordinal`` prompt set's texts and the successor-head tasks.

Both are about the same thing (ordered lists a model can continue: days,
months, numbers, letters), so they live together, beside the other built-in
prompt data. The tasks are the ordered item lists the successor-head detector
(``headscope.analyses.successor``) scores; the texts are short written-out
sequences for scanning attention on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from headscope.errors import HeadscopeError

#: the ``ordinal`` prompt set: one short sequence per prompt
ORDINAL_TEXTS: tuple[str, ...] = (
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday",
    "Thursday, Friday, Saturday, Sunday, Monday, Tuesday",
    "January, February, March, April, May, June",
    "August, September, October, November, December, January",
    "1, 2, 3, 4, 5, 6, 7, 8",
    "14, 15, 16, 17, 18, 19, 20",
    "31, 32, 33, 34, 35, 36",
    "97, 98, 99, 100, 101, 102",
    "one, two, three, four, five, six",
    "five, six, seven, eight, nine, ten",
    "first, second, third, fourth, fifth",
    "third, fourth, fifth, sixth, seventh, eighth",
    "A, B, C, D, E, F, G",
    "K, L, M, N, O, P, Q",
    "a, b, c, d, e, f, g",
    "Mon, Tue, Wed, Thu, Fri",
    "Wed, Thu, Fri, Sat, Sun",
    "Jan, Feb, Mar, Apr, May",
    "Sep, Oct, Nov, Dec, Jan",
    "I, II, III, IV, V, VI, VII",
    "1st, 2nd, 3rd, 4th, 5th, 6th",
    "10, 20, 30, 40, 50, 60",
    "spring, summer, autumn, winter, spring, summer",
    "2019, 2020, 2021, 2022, 2023, 2024",
)


@dataclass(frozen=True)
class OrdinalTask:
    """An ordered list of items; ``cyclic`` when the last is followed by the first."""

    name: str
    items: tuple[str, ...]
    cyclic: bool


_DAYS = tuple("Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split())
_MONTHS = tuple(
    "January February March April May June July August September October November December".split()
)
_NUMBER_WORDS = tuple(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split()
)
_ORDINALS = tuple("first second third fourth fifth sixth seventh eighth ninth tenth".split())

ORDINAL_TASKS: tuple[OrdinalTask, ...] = (
    OrdinalTask("numbers", tuple(str(i) for i in range(1, 201)), cyclic=False),
    OrdinalTask("number_words", _NUMBER_WORDS, cyclic=False),
    OrdinalTask("ordinals", _ORDINALS, cyclic=False),
    OrdinalTask("days", _DAYS, cyclic=True),
    OrdinalTask("months", _MONTHS, cyclic=True),
    OrdinalTask("day_abbreviations", tuple(d[:3] for d in _DAYS), cyclic=True),
    OrdinalTask("month_abbreviations", tuple(m[:3] for m in _MONTHS), cyclic=True),
    OrdinalTask("letters", tuple(chr(ord("A") + i) for i in range(26)), cyclic=False),
)
#: the digits as a cyclic task (9 -> 0): the successor heads' mod-10 check, scored apart
MOD10_TASK = OrdinalTask("digits_mod10", tuple("0123456789"), cyclic=True)
TASKS_BY_NAME: dict[str, OrdinalTask] = {task.name: task for task in ORDINAL_TASKS}


def task_by_name(name: str) -> OrdinalTask:
    if name not in TASKS_BY_NAME:
        raise HeadscopeError(
            f"unknown ordinal task '{name}'; choose from {', '.join(TASKS_BY_NAME)}"
        )
    return TASKS_BY_NAME[name]
