"""The questions `parley bench quality` asks, with the answers it accepts.

Written for Parley: short questions a voice agent hears, in three groups — general
knowledge, arithmetic, and customer-support questions whose answers are in the shop's
system prompt. A reply is right when one of the accepted answers appears in it as a whole
word or phrase (case and punctuation ignored), and none of the `refuse` phrases does: a
reply that names every candidate ("Paris or Lyon") is not an answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GENERAL_SYSTEM = "You are a helpful voice assistant. Answer in one short sentence."

SHOP_SYSTEM = (
    "You are the voice assistant of Harbour Kitchen, a restaurant in Bristol with an online "
    "shop. Answer the customer in one short sentence using only these facts. "
    "Opening hours: Monday to Saturday 9 am to 10 pm, closed on Sunday. "
    "Delivery: free on orders over 30 pounds, otherwise 4 pounds; it takes 45 minutes. "
    "Returns: unopened shop items can be returned within 14 days for a full refund. "
    "Table bookings: up to 8 people online; larger groups must phone 0117 496 0321. "
    "Payment: cards and Apple Pay, no cash. The head chef is Marta Silva. "
    "Gift cards cost 25 or 50 pounds and are valid for 12 months. "
    "Parking: free for guests in the Quay Street car park for 2 hours. "
    "The vegan menu has 6 dishes; the most popular is the mushroom risotto. "
    "Allergens: every dish can be made gluten free except the pizza. "
    "Wi-Fi password: harbour2026.")


@dataclass(frozen=True)
class Question:
    group: str  # "general" | "arithmetic" | "support"
    text: str
    accept: tuple[str, ...]
    refuse: tuple[str, ...] = ()

    @property
    def system(self) -> str:
        return SHOP_SYSTEM if self.group == "support" else GENERAL_SYSTEM


def _q(group: str, text: str, *accept: str, refuse: tuple[str, ...] = ()) -> Question:
    return Question(group, text, tuple(accept), refuse)


def _g(text: str, *accept: str, refuse: tuple[str, ...] = ()) -> Question:
    return _q("general", text, *accept, refuse=refuse)


def _a(text: str, *accept: str) -> Question:
    return _q("arithmetic", text, *accept)


def _s(text: str, *accept: str, refuse: tuple[str, ...] = ()) -> Question:
    return _q("support", text, *accept, refuse=refuse)


QUESTIONS: tuple[Question, ...] = (
    # general knowledge
    _g("What is the capital of France?", "paris"),
    _g("What is the capital city of Japan?", "tokyo"),
    _g("Which planet is closest to the sun?", "mercury"),
    _g("What is the largest planet in our solar system?", "jupiter"),
    _g("What gas do plants take in from the air to make food?", "carbon dioxide", "co2"),
    _g("How many legs does a spider have?", "eight", "8"),
    _g("What is the chemical symbol for gold?", "au"),
    _g("Who wrote the play Romeo and Juliet?", "shakespeare"),
    _g("What is the freezing point of water in degrees Celsius?", "zero", "0"),
    _g("Which ocean is the largest on Earth?", "pacific"),
    _g("What language is mainly spoken in Brazil?", "portuguese"),
    _g("How many days are there in a leap year?", "366"),
    _g("What is the tallest mountain in the world?", "everest"),
    _g("Which animal is known as the king of the jungle?", "lion"),
    _g("What colour do you get when you mix blue and yellow?", "green"),
    _g("What is the currency of the United Kingdom?", "pound", "pounds", "sterling"),
    _g("On which continent is Egypt?", "africa"),
    _g("What is the longest river in South America?", "amazon"),
    _g("How many continents are there?", "seven", "7"),
    _g("Which organ pumps blood around the human body?", "heart"),
    _g("What do bees make?", "honey"),
    _g("Who painted the Mona Lisa?", "leonardo", "da vinci"),
    _g("What is the boiling point of water at sea level in degrees Celsius?",
       "100", "one hundred"),
    _g("Which is the smallest prime number?", "two", "2"),
    _g("What is the capital of Italy?", "rome"),
    _g("What is the main ingredient of guacamole?", "avocado", "avocados"),
    _g("How many hours are there in a day?", "24", "twenty-four", "twenty four"),
    _g("Which metal is liquid at room temperature?", "mercury"),
    # arithmetic
    _a("What is 7 plus 5?", "12", "twelve"),
    _a("What is 9 times 6?", "54", "fifty-four", "fifty four"),
    _a("What is 100 minus 37?", "63", "sixty-three", "sixty three"),
    _a("What is 48 divided by 8?", "6", "six"),
    _a("What is 15 plus 27?", "42", "forty-two", "forty two"),
    _a("What is 12 times 12?", "144"),
    _a("What is half of 90?", "45", "forty-five", "forty five"),
    _a("What is 3 squared?", "9", "nine"),
    _a("What is 20 percent of 50?", "10", "ten"),
    _a("How many minutes are there in two hours?", "120", "one hundred and twenty",
       "one hundred twenty"),
    _a("What is 1000 minus 1?", "999"),
    _a("What is 8 plus 8 plus 8?", "24", "twenty-four", "twenty four"),
    _a("What is 81 divided by 9?", "9", "nine"),
    _a("What is 6 times 7?", "42", "forty-two", "forty two"),
    _a("If I buy 3 apples at 2 dollars each, how much do I pay in dollars?", "6", "six"),
    _a("What is 25 plus 75?", "100", "one hundred"),
    # customer support: the answer is in SHOP_SYSTEM
    _s("What time do you open on Monday?", "9", "nine"),
    _s("Are you open on Sunday?", "closed", "no", "not open"),
    _s("What time do you close?", "10", "ten"),
    _s("How much does delivery cost for a small order?", "4", "four"),
    _s("Is delivery free if I spend 40 pounds?", "yes", "free"),
    _s("How long does delivery take?", "45", "forty-five", "forty five"),
    _s("How many days do I have to return an item?", "14", "fourteen"),
    _s("Can I pay with cash?", "no", "not", "don't", "do not", "only cards"),
    _s("Who is your head chef?", "marta", "silva"),
    _s("How many people can I book a table for online?", "8", "eight"),
    _s("What number should I call to book for a group of twelve?", "0117 496 0321",
       "0117"),
    _s("How much are your gift cards?", "25", "50"),
    _s("How long is a gift card valid?", "12 months", "twelve months", "a year", "one year"),
    _s("Where can I park?", "quay street"),
    _s("How many vegan dishes do you have?", "6", "six"),
    _s("What is your most popular vegan dish?", "risotto"),
    _s("Can the pizza be made gluten free?", "no", "not", "cannot", "can't", "except"),
    _s("What's the Wi-Fi password?", "harbour2026"),
    _s("Which city is the restaurant in?", "bristol"),
    _s("Do you take Apple Pay?", "yes", "apple pay"),
    _s("How long can I park for free?", "2 hours", "two hours"),
    _s("Can I get a full refund on an unopened item?", "yes", "full refund"),
)


def _normal(text: str) -> str:
    text = text.lower().replace("’", "'")
    return " ".join(re.sub(r"[^\w'\- ]+", " ", text).split())


def _has(reply: str, phrase: str) -> bool:
    phrase = _normal(phrase)
    # A number may run into its unit ("9am", "45min") but not into more digits ("18").
    after = r"(?!\d)" if phrase.isdigit() else r"(?![\w-])"
    return re.search(rf"(?<![\w-]){re.escape(phrase)}{after}", reply) is not None


def correct(question: Question, reply: str) -> bool:
    text = _normal(reply)
    return (any(_has(text, a) for a in question.accept)
            and not any(_has(text, r) for r in question.refuse))
