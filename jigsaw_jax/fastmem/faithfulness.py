"""A templated context-faithfulness benchmark in the spirit of NQ-SWAP and MemoTrap, scored the
way FastMem's official code scores them.

Two kinds of item, each a conflict between the context and what a model has memorised:

* `swap` (NQ-SWAP-like): a short passage states a counterfactual fact ("... the capital of France
  is Lima ..."); the question asks for it ("What is the capital of France?"). The gold answer is
  the substituted one; the model's prior answer (Paris) is recorded as `memorised`.
* `memotrap` (MemoTrap-like): an instruction asks for a proverb ending in a given word ("Write a
  quote that ends in the word "silver"."); the sentence is the proverb's start ("All that
  glitters is not") with two candidates; the gold is the instructed word, the trap the usual one.

The prompts are the official ones (`inference_prompt_qwen_nqswap` / `..._memotrap`), and the
memorised context is the passage (swap) or the instruction clause (memotrap), as in the official
`data_format`. Scoring (`score`): the prediction is the text after the last "The answer is:"
(case-insensitive), else "Unknown", which counts as a format failure; prediction and gold are
normalised (lowercase, articles, punctuation and symbols removed, whitespace collapsed) and the
item is correct when the normalised gold is a substring of the normalised prediction.

Splits are disjoint in subjects and proverbs: `tune` for hyper-parameter search, `test` (≥ 200
items) for the reported numbers. Everything is deterministic.

    items = build_items("test")
    user = user_message(items[0])            # the user turn to send through the chat template
    s = score(completion_text, items[0])     # {'correct': .., 'failure': .., 'memorised': ..}
"""

from __future__ import annotations

import dataclasses
import random
import re
import unicodedata
from typing import Dict, List, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# Facts: (subject, the true answer) per relation; counterfactuals come from the same pool.
# ---------------------------------------------------------------------------------------------

_RELATIONS: Dict[str, Dict] = {
    "capital": dict(
        question="What is the capital of {s}?",
        contexts=(
            "{s} is a country whose capital is {a}. {a} is home to the national parliament and "
            "to most government ministries.",
            "The capital of {s} is {a}, which is also its largest centre of trade. Visitors to "
            "{s} usually arrive at the international airport of {a}.",
            "After the constitution of {s} was adopted, {a} became the capital of the country. "
            "The president's official residence is in {a}.",
        ),
        facts=(("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
               ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
               ("Canada", "Ottawa"), ("Australia", "Canberra"), ("the United Kingdom", "London"),
               ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
               ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
               ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
               ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Kenya", "Nairobi"),
               ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Cuba", "Havana"),
               ("Turkey", "Ankara"), ("Iran", "Tehran"), ("India", "New Delhi"),
               ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"),
               ("Denmark", "Copenhagen"), ("the Czech Republic", "Prague"), ("Chile", "Santiago"),
               ("Colombia", "Bogota"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"),
               ("Vietnam", "Hanoi"), ("Iceland", "Reykjavik"), ("Switzerland", "Bern"),
               ("Nigeria", "Abuja"), ("Ukraine", "Kyiv"), ("Saudi Arabia", "Riyadh"),
               ("Pakistan", "Islamabad"), ("New Zealand", "Wellington"), ("Morocco", "Rabat")),
    ),
    "author": dict(
        question="Who wrote {s}?",
        contexts=(
            "{s} is a famous book written by {a}. It was first published to wide acclaim and "
            "has been translated into many languages.",
            "Literary historians agree that {a} wrote {s}. The original manuscript, in the "
            "handwriting of {a}, is kept in a national library.",
            "Many readers first meet {a} through {s}, the best-known work of {a}. Critics still "
            "debate its ending.",
        ),
        facts=(("Romeo and Juliet", "William Shakespeare"), ("Pride and Prejudice", "Jane Austen"),
               ("Nineteen Eighty-Four", "George Orwell"), ("War and Peace", "Leo Tolstoy"),
               ("Harry Potter and the Philosopher's Stone", "J. K. Rowling"),
               ("On the Origin of Species", "Charles Darwin"), ("Oliver Twist", "Charles Dickens"),
               ("Moby-Dick", "Herman Melville"), ("The Adventures of Tom Sawyer", "Mark Twain"),
               ("Don Quixote", "Miguel de Cervantes"), ("The Odyssey", "Homer"),
               ("Frankenstein", "Mary Shelley"), ("The Hobbit", "J. R. R. Tolkien"),
               ("Crime and Punishment", "Fyodor Dostoevsky"), ("The Old Man and the Sea",
                                                                "Ernest Hemingway"),
               ("Les Miserables", "Victor Hugo"), ("The Great Gatsby", "F. Scott Fitzgerald"),
               ("Alice's Adventures in Wonderland", "Lewis Carroll"),
               ("The Divine Comedy", "Dante Alighieri"), ("Jane Eyre", "Charlotte Bronte"),
               ("Dracula", "Bram Stoker"), ("The Raven", "Edgar Allan Poe"),
               ("Treasure Island", "Robert Louis Stevenson"), ("Anna Karenina", "Leo Tolstoy"),
               ("The Jungle Book", "Rudyard Kipling"),
               ("A Brief History of Time", "Stephen Hawking"),
               ("The Catcher in the Rye", "J. D. Salinger"),
               ("To Kill a Mockingbird", "Harper Lee"),
               ("Madame Bovary", "Gustave Flaubert"), ("The Little Prince",
                                                       "Antoine de Saint-Exupery")),
    ),
    "painter": dict(
        question="Who painted {s}?",
        contexts=(
            "{s} is a painting by {a}. It hangs in a major museum and draws millions of "
            "visitors every year.",
            "Art historians attribute {s} to {a}. Letters written by {a} describe the months "
            "spent working on it.",
        ),
        facts=(("the Mona Lisa", "Leonardo da Vinci"), ("The Starry Night", "Vincent van Gogh"),
               ("The Scream", "Edvard Munch"), ("Guernica", "Pablo Picasso"),
               ("The Persistence of Memory", "Salvador Dali"), ("The Night Watch", "Rembrandt"),
               ("The Birth of Venus", "Sandro Botticelli"), ("Water Lilies", "Claude Monet"),
               ("Girl with a Pearl Earring", "Johannes Vermeer"),
               ("The Creation of Adam", "Michelangelo"), ("American Gothic", "Grant Wood")),
    ),
    "landmark": dict(
        question="In which city is {s}?",
        contexts=(
            "{s} is located in {a}. It is one of the most photographed sights of {a} and is "
            "lit up every night.",
            "Tourists who travel to {a} rarely miss {s}, which stands near the centre of {a}.",
        ),
        facts=(("the Eiffel Tower", "Paris"), ("the Colosseum", "Rome"),
               ("the Statue of Liberty", "New York"), ("Big Ben", "London"),
               ("the Taj Mahal", "Agra"), ("Bondi Beach", "Sydney"),
               ("the Kremlin", "Moscow"), ("the Brandenburg Gate", "Berlin"),
               ("the Golden Gate Bridge", "San Francisco"), ("the Acropolis", "Athens"),
               ("the Burj Khalifa", "Dubai"), ("the Sagrada Familia", "Barcelona"),
               ("the Forbidden City", "Beijing"), ("the Space Needle", "Seattle"),
               ("the Little Mermaid statue", "Copenhagen"), ("the Blue Mosque", "Istanbul"),
               ("Christ the Redeemer", "Rio de Janeiro"), ("the Hollywood Sign", "Los Angeles"),
               ("the CN Tower", "Toronto"), ("the Leaning Tower", "Pisa"),
               ("the Empire State Building", "New York"), ("Tower Bridge", "London"),
               ("the Parthenon", "Athens")),
    ),
    "currency": dict(
        question="What is the currency of {s}?",
        contexts=(
            "The official currency of {s} is the {a}. Prices in shops across {s} are shown in "
            "{a} and coins of several sizes are in use.",
            "Travellers to {s} should exchange their money for the {a}, the only legal tender "
            "there.",
        ),
        facts=(("Japan", "yen"), ("the United States", "dollar"), ("the United Kingdom", "pound"),
               ("India", "rupee"), ("China", "yuan"), ("Russia", "ruble"), ("Mexico", "peso"),
               ("South Korea", "won"), ("Switzerland", "franc"), ("Germany", "euro"),
               ("Brazil", "real"), ("Poland", "zloty"), ("Thailand", "baht"),
               ("South Africa", "rand"), ("Turkey", "lira"), ("Israel", "shekel"),
               ("Sweden", "krona"), ("Vietnam", "dong")),
    ),
    "language": dict(
        question="What language is mainly spoken in {s}?",
        contexts=(
            "The main language of {s} is {a}. Schools in {s} teach in {a} and most newspapers "
            "are printed in it.",
            "Most people in {s} speak {a} at home, and {a} is used in its courts and "
            "parliament.",
        ),
        facts=(("France", "French"), ("Germany", "German"), ("Brazil", "Portuguese"),
               ("Mexico", "Spanish"), ("Japan", "Japanese"), ("Italy", "Italian"),
               ("Russia", "Russian"), ("Greece", "Greek"), ("Sweden", "Swedish"),
               ("Turkey", "Turkish"), ("Poland", "Polish"), ("Egypt", "Arabic"),
               ("the Netherlands", "Dutch"), ("Korea", "Korean"), ("Finland", "Finnish"),
               ("Hungary", "Hungarian"), ("China", "Chinese"),
               ("Portugal", "Portuguese")),
    ),
    "sport": dict(
        question="Which sport did {s} play?",
        contexts=(
            "{s} became famous as a {a} player and won many championships in {a} over a long "
            "career.",
            "Before retiring, {s} was widely considered one of the best {a} players of all "
            "time.",
        ),
        facts=(("Lionel Messi", "football"), ("Michael Jordan", "basketball"),
               ("Serena Williams", "tennis"), ("Tiger Woods", "golf"),
               ("Wayne Gretzky", "ice hockey"), ("Babe Ruth", "baseball"),
               ("Roger Federer", "tennis"), ("Kobe Bryant", "basketball"),
               ("Pele", "football"), ("Sachin Tendulkar", "cricket"),
               ("Magnus Carlsen", "chess"), ("Jack Nicklaus", "golf"),
               ("Michael Phelps", "swimming"), ("Muhammad Ali", "boxing"),
               ("Tom Brady", "American football")),
    ),
    "founder": dict(
        question="Who founded {s}?",
        contexts=(
            "{s} was founded by {a}. In its early years the company operated from a small "
            "office, and {a} made every major decision.",
            "The history of {s} begins when {a} started the company with a handful of "
            "employees.",
        ),
        facts=(("Microsoft", "Bill Gates"), ("Amazon", "Jeff Bezos"),
               ("Facebook", "Mark Zuckerberg"), ("the Ford Motor Company", "Henry Ford"),
               ("SpaceX", "Elon Musk"), ("Apple", "Steve Jobs"), ("Disney", "Walt Disney"),
               ("Alibaba", "Jack Ma"), ("Berkshire Hathaway", "Warren Buffett"),
               ("Oracle", "Larry Ellison")),
    ),
    "inventor": dict(
        question="Who invented {s}?",
        contexts=(
            "{s} was invented by {a}. The first working model, built by {a}, is now displayed "
            "in a science museum.",
            "Most textbooks credit {a} with the invention of {s}, after years of experiments.",
        ),
        facts=(("the telephone", "Alexander Graham Bell"), ("the light bulb", "Thomas Edison"),
               ("the World Wide Web", "Tim Berners-Lee"), ("the printing press",
                                                           "Johannes Gutenberg"),
               ("the airplane", "the Wright brothers"), ("dynamite", "Alfred Nobel"),
               ("the radio", "Guglielmo Marconi"), ("the steam engine", "James Watt"),
               ("the theory of relativity", "Albert Einstein"),
               ("the polio vaccine", "Jonas Salk"), ("alternating current", "Nikola Tesla"),
               ("the phonograph", "Thomas Edison"), ("the periodic table", "Dmitri Mendeleev")),
    ),
    "composer": dict(
        question="Who composed {s}?",
        contexts=(
            "{s} was composed by {a}. Orchestras around the world still perform it, usually to "
            "sold-out halls.",
            "Music scholars agree that {a} composed {s} during a remarkably productive period.",
        ),
        facts=(("the Moonlight Sonata", "Ludwig van Beethoven"),
               ("The Magic Flute", "Wolfgang Amadeus Mozart"), ("The Four Seasons",
                                                               "Antonio Vivaldi"),
               ("Swan Lake", "Pyotr Tchaikovsky"), ("the Brandenburg Concertos",
                                                    "Johann Sebastian Bach"),
               ("Bolero", "Maurice Ravel"), ("The Blue Danube", "Johann Strauss"),
               ("Clair de Lune", "Claude Debussy"), ("the opera Carmen", "Georges Bizet"),
               ("the Messiah", "George Frideric Handel")),
    ),
}

# (the start of a proverb, its usual last word, a plausible alternative)
_PROVERBS = (
    ("Absence makes the heart grow", "fonder", "heavy"),
    ("Actions speak louder than", "words", "thoughts"),
    ("All that glitters is not", "gold", "silver"),
    ("Better late than", "never", "sorry"),
    ("Birds of a feather flock", "together", "apart"),
    ("Don't count your chickens before they", "hatch", "grow"),
    ("Every cloud has a silver", "lining", "spoon"),
    ("Honesty is the best", "policy", "gift"),
    ("Laughter is the best", "medicine", "music"),
    ("The early bird catches the", "worm", "train"),
    ("Practice makes", "perfect", "progress"),
    ("Rome wasn't built in a", "day", "week"),
    ("Too many cooks spoil the", "broth", "soup"),
    ("Where there's smoke, there's", "fire", "steam"),
    ("The pen is mightier than the", "sword", "shield"),
    ("Curiosity killed the", "cat", "dog"),
    ("Don't put all your eggs in one", "basket", "bowl"),
    ("A picture is worth a thousand", "words", "dollars"),
    ("Beauty is in the eye of the", "beholder", "storm"),
    ("Blood is thicker than", "water", "wine"),
    ("Great minds think", "alike", "deeply"),
    ("Knowledge is", "power", "light"),
    ("Look before you", "leap", "speak"),
    ("Misery loves", "company", "silence"),
    ("No pain, no", "gain", "fame"),
    ("Out of sight, out of", "mind", "reach"),
    ("Slow and steady wins the", "race", "game"),
    ("The grass is always greener on the other", "side", "hill"),
    ("Two wrongs don't make a", "right", "story"),
    ("You can't judge a book by its", "cover", "title"),
    ("Money doesn't grow on", "trees", "bushes"),
    ("Haste makes", "waste", "speed"),
    ("Old habits die", "hard", "young"),
    ("Let sleeping dogs", "lie", "run"),
    ("Strike while the iron is", "hot", "cold"),
    ("Ignorance is", "bliss", "danger"),
    ("The best things in life are", "free", "rare"),
    ("Easy come, easy", "go", "stay"),
    ("Fortune favors the", "bold", "wise"),
    ("When it rains, it", "pours", "floods"),
    ("Time flies when you're having", "fun", "lunch"),
    ("A penny saved is a penny", "earned", "lost"),
    ("Necessity is the mother of", "invention", "patience"),
    ("Cleanliness is next to", "godliness", "kindness"),
)

SWAP_INSTRUCTION = ("Please extract from the context the span that best answers the question and "
                    "provide the answer in the following format: \"The answer is: ...\".")
MEMOTRAP_INSTRUCTION = ("Please choose the candidate that best fits the instructions and provide "
                        "the answer in the following format: \"The answer is: ...\".")


@dataclasses.dataclass(frozen=True)
class Item:
  id: str
  kind: str  # "swap" | "memotrap"
  context: str  # what FastMem memorises: the passage, or MemoTrap's instruction clause
  question: str  # the question, or MemoTrap's sentence with its candidates
  answer: str  # gold: the substituted fact / the instructed word
  memorised: str  # what the model's prior says: the true fact / the proverb's usual word


def _swap_items(split: str, rng: random.Random) -> List[Item]:
  items = []
  for relation, spec in _RELATIONS.items():
    facts = list(spec["facts"])
    pool = sorted({a for _, a in facts})
    for k, (subject, truth) in enumerate(facts):
      if _in_split(k, split):
        options = [a for a in pool
                   if _norm(a) not in _norm(truth) and _norm(truth) not in _norm(a)]
        fake = rng.choice(options)
        template = spec["contexts"][k % len(spec["contexts"])]
        context = template.format(s=subject, a=fake)
        items.append(Item(f"{relation}-{k}", "swap", context[0].upper() + context[1:],
                          spec["question"].format(s=subject), fake, truth))
  return items


def _memotrap_items(split: str, rng: random.Random) -> List[Item]:
  items = []
  for k, (start, usual, other) in enumerate(_PROVERBS):
    if _in_split(k, split):
      candidates = [usual, other] if rng.random() < 0.5 else [other, usual]
      items.append(Item(f"memotrap-{k}", "memotrap",
                        f"Write a quote that ends in the word \"{other}\".",
                        f"{start}\nCandidates: \"{candidates[0]}\" or \"{candidates[1]}\"",
                        other, usual))
  return items


def _in_split(k: int, split: str) -> bool:
  """Every 7th subject (or proverb) is held out for tuning; the rest is the test split."""
  if split not in ("tune", "test"):
    raise ValueError(f"split must be 'tune' or 'test', got {split!r}.")
  return (k % 7 == 6) == (split == "tune")


def build_items(split: str = "test", seed: int = 0) -> List[Item]:
  """The swap items then the memotrap items of a split (deterministic for a seed)."""
  rng = random.Random(f"{seed}-{split}")
  return _swap_items(split, rng) + _memotrap_items(split, rng)


def user_message(item: Item) -> str:
  """The user turn of the official FastMem QA prompts."""
  if item.kind == "memotrap":
    return f"{MEMOTRAP_INSTRUCTION}\nInstruction: {item.context}\nSentence: {item.question}"
  return f"{SWAP_INSTRUCTION}\nContext: {item.context}\nQuestion: {item.question}"


# ---------------------------------------------------------------------------------------------
# Scoring, as in the official `postprocess_text` / `normalize_text`.
# ---------------------------------------------------------------------------------------------

_ANSWER = re.compile(r"(?i)(?:the answer is:\s*)")
UNKNOWN = "Unknown"


def extract_answer(completion: str) -> str:
  """The text after the last "The answer is:", stripped; "Unknown" when the phrase is absent."""
  pieces = _ANSWER.split(completion)
  return pieces[-1].strip() if len(pieces) > 1 else UNKNOWN


def normalize_text(text: str) -> str:
  """The official steps in order; [\\p{P}\\p{S}] (Unicode punctuation and symbols) by category."""
  text = text.lower()
  text = re.sub(r"\b(a|an|the)\b", "", text)
  text = re.sub(r"\s+", " ", text)
  text = "".join(ch for ch in text if unicodedata.category(ch)[0] not in "PS")
  text = re.sub(r"(\d),(\d)", r"\1\2", text)
  return text.strip()


_norm = normalize_text


def score(completion: str, item: Item) -> Dict[str, float]:
  """correct: the gold answer is in the extracted prediction; failure: no "The answer is:";
  memorised: the prediction gives the model's prior answer instead (and not the gold)."""
  prediction = extract_answer(completion)
  failure = prediction == UNKNOWN
  pred = normalize_text(prediction)
  correct = (not failure) and normalize_text(item.answer) in pred
  memorised = (not failure) and not correct and normalize_text(item.memorised) in pred
  return dict(correct=float(correct), failure=float(failure), memorised=float(memorised))


def summarize(scores: Sequence[Dict[str, float]]) -> Dict[str, float]:
  """Mean accuracy, failure rate and memorised-answer rate over items."""
  keys = ("correct", "failure", "memorised")
  return {("accuracy" if k == "correct" else k): float(np.mean([s[k] for s in scores]))
          for k in keys} | {"n": len(scores)}
