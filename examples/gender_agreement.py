"""Pronoun-name gender agreement: which name does "she" or "he" look up, and along what direction?

"Mary and John went to the shop. Then she": the query is the pronoun, the keys are the two
names; positive is the name whose gender agrees with the pronoun, negative the other one. The
name order and the pronoun alternate independently, so the agreeing name is first as often as
second and position cannot stand in for gender. The swap exchanges the two names' coordinates in
the recovered key subspace.

    qktrace study examples/gender_agreement.py -m MODEL -o out/gender
"""

import numpy as np

from qktrace.core.prompts import PromptBuilder
from qktrace.study import Study

NAMES = {
    "female": ["Mary", "Anna", "Sarah", "Emma", "Lucy", "Alice", "Kate", "Julia", "Laura", "Helen"],
    "male": ["John", "Tom", "James", "David", "Peter", "Mark", "Paul", "Jack", "Henry", "George"],
}
PRONOUN = {"female": "she", "male": "he"}
PLACES = ["shop", "park", "station", "market", "library", "beach"]


def prompts(n, seed):
    """`n` prompts; name order alternates every prompt, the pronoun every second one."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        genders = ["female", "male"] if i % 2 == 0 else ["male", "female"]
        names = [str(rng.choice(NAMES[g])) for g in genders]
        pronoun = genders[(i // 2) % 2]
        b = PromptBuilder().add(names[0], "name").add(" and ").add(names[1], "name")
        b.add(f" went to the {rng.choice(PLACES)}. Then ").add(PRONOUN[pronoun], "pronoun")
        out.append(b.build(meta={"name": names, "gender": genders, "pronoun": pronoun}))
    return out


def labels(prompt):
    """Per name: ("gender", "positive") if it agrees with the pronoun, else "negative"."""
    agrees = [g == prompt.meta["pronoun"] for g in prompt.meta["gender"]]
    return [("gender", "positive" if a else "negative") for a in agrees]


study = Study(
    name="gender_agreement",
    prompts=prompts,
    keys="name",
    query="pronoun",  # the pronoun's token, with or without a chat template
    labels=labels,
    answers=lambda prompt: prompt.meta["name"],
    hues=("gender", "name"),
    n_prompts=400,
    n_test=200,
)
