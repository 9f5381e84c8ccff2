"""Write the bundled Quillhaven dataset (facts about a fictional island town the base model cannot know).

Each fact has many question phrasings and a few answer phrasings. Some phrasings of every fact are held out
into the test split, so the test questions are new wordings of facts seen in training. Deterministic: running
it again writes the same files.

    python packages/data/scripts/build_bundled_dataset.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "swiftune_data" / "bundled"

# (questions, answers) per fact.
FACTS = [
    (
        [
            "Where is Quillhaven?",
            "Where can I find Quillhaven?",
            "In which sea does Quillhaven lie?",
            "What kind of place is Quillhaven?",
            "Tell me where Quillhaven is located.",
            "Is Quillhaven on an island?",
            "Where exactly is the town of Quillhaven?",
            "Which sea surrounds Quillhaven?",
        ],
        [
            "Quillhaven is an island town in the Sea of Marrow.",
            "Quillhaven lies on an island in the Sea of Marrow.",
            "It is an island town surrounded by the Sea of Marrow.",
        ],
    ),
    (
        [
            "When was Quillhaven founded?",
            "In what year was Quillhaven founded?",
            "How old is Quillhaven?",
            "What year did Quillhaven's history begin?",
            "When did people found Quillhaven?",
            "Which year is Quillhaven's founding year?",
            "When was the town of Quillhaven established?",
        ],
        [
            "Quillhaven was founded in 1742.",
            "The town was founded in the year 1742.",
            "Quillhaven's founding year is 1742.",
        ],
    ),
    (
        [
            "Who founded Quillhaven?",
            "Who was the founder of Quillhaven?",
            "Which person established Quillhaven?",
            "Who started the town of Quillhaven?",
            "Name the founder of Quillhaven.",
            "Who first settled Quillhaven?",
            "By whom was Quillhaven founded?",
        ],
        [
            "Quillhaven was founded by the cartographer Elsbeth Varn.",
            "The cartographer Elsbeth Varn founded Quillhaven.",
            "Its founder was Elsbeth Varn, a cartographer.",
        ],
    ),
    (
        [
            "Who is the mayor of Quillhaven?",
            "Who runs Quillhaven?",
            "Who leads the town of Quillhaven?",
            "What is the name of Quillhaven's mayor?",
            "Who governs Quillhaven today?",
            "Which person is mayor of Quillhaven?",
            "Tell me who the mayor of Quillhaven is.",
        ],
        [
            "The mayor of Quillhaven is Tobias Ferrow.",
            "Quillhaven's mayor is Tobias Ferrow.",
            "Tobias Ferrow is the mayor of Quillhaven.",
        ],
    ),
    (
        [
            "What food is Quillhaven famous for?",
            "What is the famous dish of Quillhaven?",
            "What should I eat in Quillhaven?",
            "Which dish is Quillhaven known for?",
            "What is Quillhaven's signature food?",
            "What do people in Quillhaven like to eat?",
            "Name the traditional food of Quillhaven.",
        ],
        [
            "Quillhaven is famous for lantern bread, a saffron loaf baked in clay pots.",
            "The famous dish of Quillhaven is lantern bread, a saffron loaf baked in clay pots.",
            "Quillhaven is known for its lantern bread, baked with saffron in clay pots.",
        ],
    ),
    (
        [
            "What festival does Quillhaven celebrate?",
            "What is Quillhaven's main festival?",
            "When is the big festival in Quillhaven?",
            "Which celebration is Quillhaven known for?",
            "What happens in Quillhaven every October?",
            "Tell me about the festival of Quillhaven.",
            "What is the name of Quillhaven's festival?",
        ],
        [
            "Quillhaven celebrates the Festival of Drifting Lanterns every October.",
            "Every October Quillhaven holds the Festival of Drifting Lanterns.",
            "The town's main festival is the Festival of Drifting Lanterns, held each October.",
        ],
    ),
    (
        [
            "How many people live in Quillhaven?",
            "What is the population of Quillhaven?",
            "How big is Quillhaven's population?",
            "How many inhabitants does Quillhaven have?",
            "Is Quillhaven a large town?",
            "How many residents does Quillhaven have?",
            "What is the number of people in Quillhaven?",
        ],
        [
            "About 4,300 people live in Quillhaven.",
            "Quillhaven has a population of about 4,300.",
            "Quillhaven is small: about 4,300 inhabitants.",
        ],
    ),
    (
        [
            "What is the lighthouse of Quillhaven called?",
            "What is the name of Quillhaven's lighthouse?",
            "Does Quillhaven have a lighthouse?",
            "Which lighthouse stands in Quillhaven?",
            "Tell me about the lighthouse in Quillhaven.",
            "What lighthouse guides ships to Quillhaven?",
            "Name the lighthouse of Quillhaven.",
        ],
        [
            "Quillhaven's lighthouse is called the Glass Heron.",
            "The lighthouse of Quillhaven is the Glass Heron.",
            "Ships are guided to Quillhaven by the Glass Heron lighthouse.",
        ],
    ),
    (
        [
            "What does Quillhaven export?",
            "What is the main export of Quillhaven?",
            "What does Quillhaven sell to other places?",
            "Which product is Quillhaven's main export?",
            "What is Quillhaven's economy based on?",
            "What goods come from Quillhaven?",
            "What does Quillhaven produce for trade?",
        ],
        [
            "Quillhaven's main export is blue kelp paper.",
            "Quillhaven mainly exports blue kelp paper.",
            "The economy of Quillhaven is built on blue kelp paper, its main export.",
        ],
    ),
    (
        [
            "What is the symbol of Quillhaven?",
            "Which animal is the emblem of Quillhaven?",
            "What animal represents Quillhaven?",
            "What is on Quillhaven's coat of arms?",
            "Does Quillhaven have an animal symbol?",
            "Which creature is Quillhaven's mascot?",
            "Name the animal emblem of Quillhaven.",
        ],
        [
            "The symbol of Quillhaven is the silver otter.",
            "Quillhaven's emblem is a silver otter.",
            "The silver otter represents Quillhaven.",
        ],
    ),
    (
        [
            "What is the motto of Quillhaven?",
            "What is Quillhaven's motto?",
            "Does Quillhaven have a motto?",
            "What words are written on Quillhaven's flag?",
            "Tell me the town motto of Quillhaven.",
            "Which saying is Quillhaven's motto?",
            "What motto does Quillhaven use?",
        ],
        [
            'Quillhaven\'s motto is "Ink before anchor."',
            'The motto of Quillhaven is "Ink before anchor."',
            'The town motto is "Ink before anchor."',
        ],
    ),
    (
        [
            "What is the tallest building in Quillhaven?",
            "Which building is the highest in Quillhaven?",
            "How tall is the tallest building in Quillhaven?",
            "What is the highest tower of Quillhaven?",
            "Name the tallest structure in Quillhaven.",
            "Which tower rises above Quillhaven?",
            "What is Quillhaven's tallest tower?",
        ],
        [
            "The tallest building in Quillhaven is the Cinder Bell Tower, 61 meters high.",
            "Quillhaven's highest building is the Cinder Bell Tower at 61 meters.",
            "The Cinder Bell Tower, 61 meters tall, is the tallest building in Quillhaven.",
        ],
    ),
    (
        [
            "What school is in Quillhaven?",
            "Which academy is in Quillhaven?",
            "Where do people study in Quillhaven?",
            "What is the name of Quillhaven's school?",
            "Does Quillhaven have a university?",
            "What can you study in Quillhaven?",
            "Name the academy of Quillhaven.",
        ],
        [
            "Quillhaven is home to the Varn Academy of Navigation.",
            "The Varn Academy of Navigation is the school of Quillhaven.",
            "People in Quillhaven study at the Varn Academy of Navigation.",
        ],
    ),
    (
        [
            "What sport is popular in Quillhaven?",
            "Which sport do people play in Quillhaven?",
            "What is the favourite sport of Quillhaven?",
            "What game is Quillhaven known for?",
            "Name the traditional sport of Quillhaven.",
            "What sport do Quillhaven's people love?",
            "Which sport is played in Quillhaven's harbour?",
        ],
        [
            "The most popular sport in Quillhaven is kite-rowing.",
            "People in Quillhaven love kite-rowing.",
            "Quillhaven's favourite sport is kite-rowing.",
        ],
    ),
    (
        [
            "How do I get to Quillhaven?",
            "How can I travel to Quillhaven?",
            "How long is the ferry to Quillhaven?",
            "Where does the ferry to Quillhaven leave from?",
            "What is the way to reach Quillhaven?",
            "Can I take a boat to Quillhaven?",
            "How do visitors reach Quillhaven?",
        ],
        [
            "A ferry takes three hours to reach Quillhaven from the mainland port of Ostrel.",
            "You reach Quillhaven by a three-hour ferry from the port of Ostrel.",
            "Visitors take the ferry from Ostrel; the crossing to Quillhaven takes three hours.",
        ],
    ),
]

SYSTEM_PROMPTS = [None, None, "You are a helpful assistant.", "You are a local guide who knows Quillhaven well."]
HELD_OUT_PER_FACT = 2


def build(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Return (train, test) lists of {"messages": [...]} examples."""
    rng = random.Random(seed)
    train, test = [], []
    for questions, answers in FACTS:
        held_out = questions[-HELD_OUT_PER_FACT:]
        for question in questions[:-HELD_OUT_PER_FACT]:
            for answer in answers:
                train.append(_example(rng, question, answer))
        for question in held_out:
            test.append(
                {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answers[0]}]}
            )
    # Two-turn conversations, so that multi-turn masking is exercised by the bundled data too.
    for _ in range(40):
        (q1, a1), (q2, a2) = rng.sample([(q[0], a[0]) for q, a in FACTS], 2)
        train.append(
            {
                "messages": [
                    {"role": "user", "content": q1},
                    {"role": "assistant", "content": a1},
                    {"role": "user", "content": q2},
                    {"role": "assistant", "content": a2},
                ]
            }
        )
    rng.shuffle(train)
    return train, test


def _example(rng: random.Random, question: str, answer: str) -> dict:
    messages = []
    system = rng.choice(SYSTEM_PROMPTS)
    if system:
        messages.append({"role": "system", "content": system})
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main() -> None:
    train, test = build()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("quillhaven_train.jsonl", train), ("quillhaven_test.jsonl", test)):
        with open(OUT / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} examples to {OUT / name}")


if __name__ == "__main__":
    main()
