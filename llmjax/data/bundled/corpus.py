"""A generated English pre-training corpus: written for llmjax, nothing downloaded.

Every document is one paragraph on one topic (daily life, science, a short story, weather, travel,
cooking, work, numbers and dates, school, sport and home), assembled from the sentence templates and
word lists in this file. A document keeps its cast: the same person, city or animal is carried through its sentences,
so there is something for a model to learn beyond word frequencies. Facts stated as facts (planet
order, days in a month, legs of an animal, arithmetic) are true.

The same seed always gives the same documents (``random.Random`` only, no set iteration); different
seeds give different ones.

Measured with ``corpus_stats(generate_corpus(10_000, seed=0))``: 10,000 documents, 484,394 words,
1,224 unique words; 2.7 MB as JSONL. (A tokenizer of 1,000-2,000 pieces therefore covers most words
whole and splits the rest, which is what a tiny T5 needs to learn something in minutes.)
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from llmjax.errors import InputError

# ----------------------------------------------------------------------------- word lists
FEMALE_NAMES = ("Anna", "Maria", "Sofia", "Emma", "Lucy", "Grace", "Hannah", "Olivia", "Mia", "Clara",
                "Rosa", "Nora", "Alice", "Ruth", "Julia", "Elena", "Priya", "Amara", "Yuki", "Leila",
                "Ingrid", "Fatima", "Chloe", "Zara", "Martha", "Eva", "Lina", "Isabel", "Naomi", "Helen")
MALE_NAMES = ("Tom", "James", "Daniel", "Peter", "Samuel", "Leo", "Omar", "Lucas", "Noah", "Victor",
              "Hugo", "Felix", "Ivan", "Marco", "David", "Kenji", "Ravi", "Mateo", "Ben", "Oscar",
              "Arthur", "Karim", "Jonas", "Pablo", "George", "Henry", "Tariq", "Erik", "Simon", "Andre")
CITIES = (("Paris", "France"), ("Rome", "Italy"), ("Madrid", "Spain"), ("Berlin", "Germany"),
          ("Vienna", "Austria"), ("Lisbon", "Portugal"), ("Dublin", "Ireland"), ("Oslo", "Norway"),
          ("Stockholm", "Sweden"), ("Athens", "Greece"), ("Cairo", "Egypt"), ("Nairobi", "Kenya"),
          ("Tokyo", "Japan"), ("Seoul", "South Korea"), ("Delhi", "India"), ("Bangkok", "Thailand"),
          ("Sydney", "Australia"), ("Toronto", "Canada"), ("Chicago", "the United States"),
          ("Mexico City", "Mexico"), ("Lima", "Peru"), ("Buenos Aires", "Argentina"),
          ("Prague", "the Czech Republic"), ("Warsaw", "Poland"), ("Edinburgh", "Scotland"))
TOWN_PLACES = ("bakery", "library", "park", "market", "post office", "train station", "museum",
               "bookshop", "cafe", "pharmacy", "swimming pool", "garden centre", "hardware store", "bank",
               "cinema", "butcher", "dentist", "town hall", "flower shop", "laundry", "toy shop")
FOODS = (("apple", "apples"), ("orange", "oranges"), ("tomato", "tomatoes"), ("potato", "potatoes"),
         ("carrot", "carrots"), ("onion", "onions"), ("egg", "eggs"), ("lemon", "lemons"),
         ("pear", "pears"), ("banana", "bananas"), ("peach", "peaches"), ("cucumber", "cucumbers"),
         ("plum", "plums"), ("melon", "melons"), ("mango", "mangoes"), ("pepper", "peppers"),
         ("cabbage", "cabbages"), ("pumpkin", "pumpkins"), ("loaf", "loaves"), ("cherry", "cherries"))
ITEMS = ("umbrella", "notebook", "loaf of bread", "bottle of milk", "newspaper", "bunch of flowers",
         "jar of honey", "pair of gloves", "map of the city", "box of tea", "blue pen", "small plant",
         "birthday card", "packet of seeds", "wool hat", "candle", "roll of tape", "cookbook", "kite")
TIMES_OF_DAY = ("morning", "afternoon", "evening")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (("January", 31), ("February", 28), ("March", 31), ("April", 30), ("May", 31), ("June", 30),
          ("July", 31), ("August", 31), ("September", 30), ("October", 31), ("November", 30),
          ("December", 31))
FEELINGS = ("happy", "tired", "calm", "excited", "proud", "curious", "relieved", "hungry", "thoughtful",
            "grateful", "sleepy", "cheerful", "content", "surprised")
HOBBIES = ("painting", "reading old novels", "playing the piano", "running by the river",
           "growing vegetables", "learning Spanish", "taking photographs", "baking bread",
           "playing chess", "watching birds", "writing letters", "repairing bicycles", "knitting a sweater",
           "drawing maps", "practising the guitar", "building model ships", "sewing curtains")
# (singular, plural, class, number of legs, habitat): legs are true for the animal.
ANIMALS = (("dog", "dogs", "mammal", 4, "in houses with people"), ("cat", "cats", "mammal", 4, "in houses with people"),
           ("horse", "horses", "mammal", 4, "on farms and in fields"), ("rabbit", "rabbits", "mammal", 4, "in burrows"),
           ("fox", "foxes", "mammal", 4, "in forests"), ("bear", "bears", "mammal", 4, "in forests and mountains"),
           ("owl", "owls", "bird", 2, "in trees"), ("duck", "ducks", "bird", 2, "near ponds and rivers"),
           ("eagle", "eagles", "bird", 2, "in the mountains"), ("penguin", "penguins", "bird", 2, "near the cold sea"),
           ("frog", "frogs", "amphibian", 4, "near ponds"), ("turtle", "turtles", "reptile", 4, "near water"),
           ("ant", "ants", "insect", 6, "in large colonies"), ("bee", "bees", "insect", 6, "in hives"),
           ("spider", "spiders", "arachnid", 8, "in webs"), ("mouse", "mice", "mammal", 4, "in fields and barns"))
ADJECTIVES = ("little", "brave", "clever", "shy", "old", "curious", "gentle", "hungry", "lonely", "cheerful",
              "sleepy", "proud", "careful", "playful", "quiet", "clumsy", "young", "patient")
STORY_PLACES = ("an old mill", "a quiet lake", "a tall oak tree", "a small village", "a dark forest",
                "a sunny hill", "a busy harbour", "a stone bridge", "a deep valley", "a muddy river",
                "a windy beach", "a snowy mountain", "an apple orchard", "a hidden cave")
LOST_THINGS = ("a golden key", "a red ball", "a silver bell", "a warm scarf", "a wooden boat", "a shiny coin",
               "a glass marble", "a paper lantern", "a tiny drum", "a blue feather", "a magic stone")
HELPERS = ("a wise owl", "a kind farmer", "a friendly dog", "an old turtle", "a young girl", "a busy squirrel",
           "a tall giraffe", "a patient fisherman", "a quick hare", "a singing bird", "an old miller")
PLANETS = ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
SCIENCE_FACTS = (
    "Water boils at one hundred degrees Celsius at sea level.",
    "Water freezes at zero degrees Celsius.",
    "Light from the Sun takes about eight minutes to reach the Earth.",
    "Plants use sunlight, water and carbon dioxide to make sugar and oxygen.",
    "The heart pumps blood through the body.",
    "Sound travels faster in water than in air.",
    "The Moon goes around the Earth about once every twenty seven days.",
    "A magnet pulls on objects made of iron.",
    "Ice is less dense than liquid water, so it floats.",
    "The Earth turns once on its axis every day.",
    "Most of the air we breathe is nitrogen.",
    "Bones give the body its shape and protect the organs inside it.",
    "Metals such as copper carry electricity well.",
    "A rainbow appears when sunlight is split by drops of rain.",
    "The Sun is a star, and it is much closer to us than any other star.",
    "Seeds need water and warmth before they can grow.",
    "Earthquakes happen when large plates of rock move under the ground.",
    "Volcanoes form where melted rock rises through the crust of the Earth.",
    "Whales are mammals, so they breathe air even though they live in the sea.",
    "Clouds are made of tiny drops of water or crystals of ice.",
    "Lightning is a giant spark of electricity in the sky.",
    "Gravity pulls objects towards the centre of the Earth.",
    "Green leaves contain chlorophyll, which captures the energy of sunlight.",
    "The human body has two hundred and six bones.",
    "Diamonds are made of carbon atoms packed tightly together.",
    "Bees carry pollen from flower to flower, which helps plants make seeds.",
    "Salt water is harder to freeze than fresh water.",
    "A year on Earth lasts about three hundred and sixty five days.",
)
WEATHER = (("sunny", "clear skies"), ("cloudy", "grey skies"), ("rainy", "steady rain"),
           ("windy", "strong gusts"), ("snowy", "light snow"), ("foggy", "thick fog"), ("stormy", "thunder"))
SEASONS = ("spring", "summer", "autumn", "winter")
VEHICLES = (("train", "by train"), ("bus", "by bus"), ("ferry", "by ferry"), ("plane", "by plane"), ("car", "by car"))
SIGHTS = ("the old town", "the central square", "the cathedral", "the river", "the art museum",
          "the botanical garden", "the harbour", "the market hall", "the castle", "the city walls")
# (dish, ingredients, steps): each recipe is plausible on its own.
RECIPES = (
    ("vegetable soup", ("carrots", "onions", "potatoes", "salt"),
     ("chop the vegetables into small pieces", "cook the onions in a little oil",
      "add the carrots, the potatoes and some water", "let the soup simmer for thirty minutes")),
    ("pancakes", ("flour", "eggs", "milk", "butter"),
     ("mix the flour with the eggs", "pour in the milk slowly and stir", "melt the butter in a pan",
      "cook each pancake until it is golden")),
    ("tomato pasta", ("pasta", "tomatoes", "garlic", "olive oil"),
     ("boil the pasta in salted water", "warm the olive oil with the garlic", "add the tomatoes and cook them down",
      "mix the sauce with the pasta")),
    ("fruit salad", ("apples", "bananas", "oranges", "lemon juice"),
     ("wash the fruit", "cut the fruit into small pieces", "put everything in a large bowl",
      "add a little lemon juice and stir gently")),
    ("rice with beans", ("rice", "beans", "onions", "pepper"),
     ("rinse the rice", "cook the rice in water for fifteen minutes", "fry the onions until they are soft",
      "stir in the beans and the rice")),
    ("banana bread", ("bananas", "flour", "sugar", "eggs"),
     ("mash the bananas with a fork", "beat the eggs with the sugar", "fold in the flour",
      "bake the bread for fifty minutes")),
)
# (job, workplace, tasks)
JOBS = (("nurse", "hospital", ("checks on the patients", "writes careful notes", "helps the doctors")),
        ("teacher", "school", ("prepares the lessons", "marks homework", "talks with the parents")),
        ("baker", "bakery", ("bakes bread before sunrise", "cleans the ovens", "orders flour")),
        ("engineer", "factory", ("tests the machines", "draws new plans", "fixes broken parts")),
        ("librarian", "library", ("sorts the returned books", "helps readers find books", "plans reading clubs")),
        ("farmer", "farm", ("feeds the animals", "repairs the fences", "plants new crops")),
        ("pilot", "airport", ("checks the weather", "flies the plane", "talks to the control tower")),
        ("chef", "restaurant", ("plans the menu", "cooks the meals", "tastes every sauce")),
        ("programmer", "office", ("writes code", "fixes bugs", "reviews the work of colleagues")),
        ("gardener", "park", ("waters the flowers", "cuts the grass", "plants young trees")),
        ("mechanic", "garage", ("repairs engines", "changes tyres", "explains the bill to customers")),
        ("journalist", "newspaper", ("interviews people", "writes articles", "checks every fact")),
        ("dentist", "clinic", ("cleans teeth", "takes pictures of teeth", "reminds patients to floss")),
        ("architect", "studio", ("designs houses", "builds small models", "visits building sites")),
        ("firefighter", "fire station", ("trains with the team", "checks the hoses", "answers emergency calls")))
SUBJECTS = ("history", "geography", "mathematics", "biology", "chemistry", "music", "art", "physics",
            "literature", "French")
SCHOOL_TASKS = ("read a chapter about ancient Egypt", "solved ten hard problems", "drew a map of the rivers",
                "sang a song in three parts", "built a small electric circuit", "wrote a poem about the sea",
                "measured the height of a tree", "planted beans in paper cups", "gave a talk about volcanoes")
SPORTS = (("football", "goal", "field"), ("tennis", "match", "court"), ("basketball", "basket", "court"),
          ("swimming", "race", "pool"), ("cycling", "race", "track"), ("volleyball", "point", "beach"))
ROOMS = ("kitchen", "living room", "bedroom", "hallway", "bathroom", "attic", "garden shed", "balcony")
CHORES = ("washed the dishes", "swept the floor", "watered the plants", "folded the laundry",
          "fixed a dripping tap", "painted the fence", "cleaned the windows", "sorted old photographs")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")


# ----------------------------------------------------------------------------- helpers
def _person(rng: random.Random) -> dict[str, str]:
    """A named person with matching pronouns, for ``str.format`` fields."""
    if rng.random() < 0.5:
        return {"name": rng.choice(FEMALE_NAMES), "he": "she", "him": "her", "his": "her"}
    return {"name": rng.choice(MALE_NAMES), "he": "he", "him": "him", "his": "his"}


def _other_name(rng: random.Random, name: str) -> str:
    return rng.choice([other for other in FEMALE_NAMES + MALE_NAMES if other != name])


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _capitalize(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def _paragraph(rng: random.Random, opening: list[str], body: list[str], closing: list[str],
               fields: dict, body_count: tuple[int, int] = (2, 4)) -> str:
    """One opening, a random subset of body sentences in random order, one closing; formatted."""
    count = min(len(body), rng.randint(*body_count))
    sentences = [rng.choice(opening), *rng.sample(body, count), rng.choice(closing)]
    return " ".join(_capitalize(s.format(**fields)) for s in sentences)


# ----------------------------------------------------------------------------- topics
def _daily_life(rng: random.Random) -> str:
    food, foods = rng.choice(FOODS)
    place, other_place = rng.sample(TOWN_PLACES, 2)
    fields = {**_person(rng), "time": rng.choice(TIMES_OF_DAY), "day": rng.choice(WEEKDAYS),
              "place": place, "other_place": other_place, "n": rng.choice(NUMBER_WORDS[2:]),
              "foods": foods, "item": _article(rng.choice(ITEMS)), "feeling": rng.choice(FEELINGS),
              "hobby": rng.choice(HOBBIES)}
    fields["friend"] = _other_name(rng, fields["name"])
    opening = ["on {day} {time}, {name} walked to the {place}.",
               "{name} woke up early on {day} and went to the {place}.",
               "it was a quiet {day} {time}, and {name} had a few errands to run."]
    body = ["at the market, {he} bought {n} {foods} and {item}.",
            "{he} met {friend} outside the {other_place}, and they talked for a while.",
            "on the way home, {he} stopped at the {other_place}.",
            "{he} paid with coins and thanked the shopkeeper.",
            "{name} forgot {his} list, so {he} had to remember everything.",
            "the streets were busy, but {name} was in no hurry.",
            "{friend} asked {him} about {his} week.",
            "later, {name} spent an hour {hobby}."]
    closing = ["when {he} got home, {name} felt {feeling}.",
               "by the end of the day, {name} was {feeling} and ready for bed.",
               "it had been a good {day} for {name}."]
    return _paragraph(rng, opening, body, closing, fields)


def _science(rng: random.Random) -> str:
    animal, animals, kind, legs, habitat = rng.choice(ANIMALS)
    index = rng.randrange(len(PLANETS))
    facts = rng.sample(SCIENCE_FACTS, 2)
    fields = {"animal": animal, "animals": animals, "a_animal": _article(animal), "a_kind": _article(kind),
              "legs": NUMBER_WORDS[legs], "habitat": habitat, "planet": PLANETS[index],
              "ordinal": ORDINALS[index], "fact": facts[0], "other_fact": facts[1],
              "previous": PLANETS[index - 1]}
    first = "{planet} is the {ordinal} planet from the Sun." + (" It comes after {previous}." if index else "")
    opening = ["here are a few facts about nature.", "scientists have learned many things about the world.",
               "this is a short lesson about science."]
    body = ["{a_animal} is {a_kind}.", "{animals} have {legs} legs.", "many {animals} live {habitat}.",
            first, "{fact}", "{other_fact}", "there are eight planets in our solar system."]
    closing = ["science helps us understand the world around us.",
               "there is always more to discover.", "questions like these lead to new discoveries."]
    return _paragraph(rng, opening, body, closing, fields, body_count=(3, 5))


def _story(rng: random.Random) -> str:
    animal, helper = rng.choice(ANIMALS)[0], rng.choice(HELPERS)
    adjective = rng.choice(ADJECTIVES)
    fields = {"a_adj": _article(adjective), "animal": animal, "place": rng.choice(STORY_PLACES),
              "thing": rng.choice(LOST_THINGS), "helper": helper,
              "the_helper": "the " + helper.split(" ", 1)[1],
              "season": rng.choice(SEASONS), "feeling": rng.choice(FEELINGS)}
    beginning = rng.choice(["once upon a time, {a_adj} {animal} lived near {place}.",
                            "long ago, in the {season}, there was {a_adj} {animal} who lived near {place}."])
    problem = rng.choice(["one day, the {animal} lost {thing}.",
                          "one morning, the {animal} found that {thing} had disappeared.",
                          "one evening, a storm came and carried away {thing}."])
    search = rng.choice(["the {animal} looked everywhere, but {thing} was nowhere to be found.",
                         "the {animal} searched under every stone and behind every tree.",
                         "the {animal} asked everyone it met, but nobody had seen it."])
    help_ = rng.choice(["then {helper} came by and offered to help.",
                        "at last, {helper} said that something shiny was lying near {place}."])
    ending = rng.choice(["together they found {thing}, and the {animal} was {feeling}.",
                         "the {animal} thanked {the_helper}, and from that day on they were good friends.",
                         "in the end, the {animal} learned that asking for help is a brave thing to do."])
    return " ".join(_capitalize(s.format(**fields)) for s in (beginning, problem, search, help_, ending))


def _weather(rng: random.Random) -> str:
    (city, country), (condition, detail) = rng.choice(CITIES), rng.choice(WEATHER)
    # Snow comes with a winter season and frost; other weather with any season above freezing.
    season = "winter" if condition == "snowy" else rng.choice(SEASONS[:3])
    high = rng.randint(-10, 1) if condition == "snowy" else rng.randint(8, 35)
    fields = {"city": city, "country": country, "day": rng.choice(WEEKDAYS), "condition": condition,
              "detail": detail, "high": high, "low": high - rng.randint(3, 10), "season": season,
              "wind": rng.randint(5, 60), "next_day": rng.choice(WEEKDAYS)}
    opening = ["here is the weather forecast for {city} on {day}.",
               "the weather in {city}, {country}, will change this week."]
    body = ["{day} will be {condition}, with {detail} for most of the day.",
            "the high will be {high} degrees and the low will be {low} degrees.",
            "winds will reach {wind} kilometres per hour in the afternoon.",
            "on {next_day}, the weather should be calmer.",
            "it is a typical {season} week in {country}."]
    closing = ["take an umbrella if you go out.", "have a pleasant week.",
               "check the forecast again tomorrow morning."]
    return _paragraph(rng, opening, body, closing, fields)


def _travel(rng: random.Random) -> str:
    (start, start_country), (end, end_country) = rng.sample(CITIES, 2)
    vehicle, by_vehicle = rng.choice(VEHICLES)
    sight, other_sight = rng.sample(SIGHTS, 2)
    fields = {**_person(rng), "start": start, "end": end, "country": end_country, "vehicle": vehicle,
              "by_vehicle": by_vehicle, "hours": rng.randint(2, 14), "nights": NUMBER_WORDS[rng.randint(2, 9)],
              "sight": sight, "other_sight": other_sight, "month": rng.choice(MONTHS)[0],
              "feeling": rng.choice(FEELINGS)}
    opening = ["in {month}, {name} travelled from {start} to {end} {by_vehicle}.",
               "{name} had always wanted to visit {end}, so in {month} {he} finally went."]
    body = ["the {vehicle} journey took {hours} hours.",
            "{he} stayed for {nights} nights in a small hotel near {sight}.",
            "on the first day, {he} visited {sight} and {other_sight}.",
            "{name} tried the local food and wrote postcards to {his} family.",
            "the people of {country} were friendly and helpful.",
            "{he} took many photographs of {other_sight}."]
    closing = ["when {he} returned to {start}, {name} was already planning the next trip.",
               "{name} came home {feeling} and full of stories."]
    return _paragraph(rng, opening, body, closing, fields)


def _cooking(rng: random.Random) -> str:
    dish, ingredients, steps = rng.choice(RECIPES)
    cook = _person(rng)
    people, minutes = rng.randint(2, 8), rng.choice((20, 30, 40, 45, 60))
    listed = ", ".join(ingredients[:-1]) + " and " + ingredients[-1]
    connectives = ("first", "next", "then", "after that")
    sentences = [rng.choice([f"this is a simple recipe for {dish}.",
                             f"{cook['name']} often makes {dish} for {cook['his']} family.",
                             f"here is how {cook['name']} makes {dish} on a {rng.choice(WEEKDAYS)}."]),
                 f"to make {dish} for {people} people, you need {listed}.",
                 *[f"{word}, {step}." for word, step in zip(connectives, steps)]]
    tips = [f"the whole recipe takes about {minutes} minutes.",
            f"{cook['name']} says the secret is to use fresh {rng.choice(ingredients)}.",
            f"you can keep the leftovers in the fridge for {NUMBER_WORDS[rng.randint(2, 4)]} days.",
            f"children can help to {rng.choice(steps)}."]
    sentences += rng.sample(tips, rng.randint(0, 2))
    sentences.append(rng.choice([f"serve the {dish} while it is warm.", f"the {dish} is ready to eat.",
                                 f"enjoy your {dish} with friends."]))
    return " ".join(_capitalize(s) for s in sentences)


def _work(rng: random.Random) -> str:
    job, workplace, tasks = rng.choice(JOBS)
    fields = {**_person(rng), "a_job": _article(job), "job": job, "workplace": workplace,
              "task": tasks[0], "task2": tasks[1], "task3": tasks[2], "day": rng.choice(WEEKDAYS),
              "start": rng.randint(6, 10), "years": NUMBER_WORDS[rng.randint(2, 12)]}
    fields["colleague"] = _other_name(rng, fields["name"])
    opening = ["{name} works as {a_job} at the {workplace}.", "{name} has been {a_job} for {years} years."]
    body = ["every morning, {he} {task}.", "in the afternoon, {he} {task2}.",
            "on {day}, {he} usually {task3}.", "{his} working day starts at {start} o'clock.",
            "{he} often has lunch with {colleague}, who also works at the {workplace}.",
            "the work is hard, but {name} enjoys it."]
    closing = ["{name} is proud to be {a_job}.", "after work, {name} likes to rest at home."]
    return _paragraph(rng, opening, body, closing, fields)


def _numbers_and_dates(rng: random.Random) -> str:
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    (month, days), year = rng.choice(MONTHS), rng.randint(1950, 2020)
    day = rng.randint(1, days)
    person = _person(rng)
    fields = {**person, "a": a, "b": b, "sum": a + b, "big": max(a, b), "small": min(a, b),
              "difference": abs(a - b), "month": month, "days": days, "day": day, "year": year,
              "age": 2024 - year, "factor": rng.randint(2, 9), "c": rng.randint(2, 12)}
    fields["product"] = fields["factor"] * fields["c"]
    opening = ["here are some numbers and dates.", "numbers are part of everyday life."]
    body = ["{a} plus {b} equals {sum}.", "{big} minus {small} equals {difference}.",
            "{factor} times {c} is {product}.", "{month} has {days} days.",
            "{name} was born on {month} {day}, {year}.", "in 2024, {name} turned {age}.",
            "there are seven days in a week and twelve months in a year."]
    closing = ["counting carefully avoids many mistakes.", "dates help us remember what happened and when."]
    return _paragraph(rng, opening, body, closing, fields, body_count=(3, 5))


def _school(rng: random.Random) -> str:
    subject, other_subject = rng.sample(SUBJECTS, 2)
    task, other_task = rng.sample(SCHOOL_TASKS, 2)
    fields = {**_person(rng), "subject": subject, "other_subject": other_subject, "task": task,
              "other_task": other_task, "day": rng.choice(WEEKDAYS[:5]), "grade": rng.choice(ORDINALS[:8]),
              "n": rng.randint(12, 30), "feeling": rng.choice(FEELINGS)}
    fields["teacher"] = _other_name(rng, fields["name"])
    opening = ["{name} is in the {grade} year at school.", "on {day}, {name} had {subject} first thing in the morning."]
    body = ["in the {subject} lesson, the class {task}.", "later, in {other_subject}, they {other_task}.",
            "there are {n} children in {his} class.", "{his} teacher, {teacher}, explains things very clearly.",
            "{name} likes {subject} more than {other_subject}.", "at lunch, {he} played outside with {his} friends."]
    closing = ["after school, {name} told {his} parents about {his} day.", "{name} went home {feeling}."]
    return _paragraph(rng, opening, body, closing, fields)


def _sport_and_home(rng: random.Random) -> str:
    sport, scoring, ground = rng.choice(SPORTS)
    room, chore, other_chore = rng.choice(ROOMS), *rng.sample(CHORES, 2)
    ours, theirs = rng.randint(0, 5), rng.randint(0, 5)
    result = "won" if ours > theirs else "lost" if ours < theirs else "drew"
    fields = {**_person(rng), "sport": sport, "scoring": scoring, "ground": ground, "room": room,
              "chore": chore, "other_chore": other_chore, "ours": ours, "theirs": theirs, "result": result,
              "day": rng.choice(WEEKDAYS[5:]), "minutes": rng.choice((20, 30, 45, 60, 90))}
    opening = ["every {day}, {name} plays {sport} with a local team.", "{name} spent {day} at home and at the {ground}."]
    body = ["this week the team {result} the game, {ours} to {theirs}.",
            "{he} trained for {minutes} minutes before the game.",
            "in the morning, {he} {chore} and then {other_chore}.",
            "the {room} was a mess, so {name} tidied it before lunch.",
            "{his} coach said that every {scoring} counts."]
    closing = ["in the evening, {name} had a hot bath and read a book.", "{name} was tired but {feeling}."]
    fields["feeling"] = rng.choice(FEELINGS)
    return _paragraph(rng, opening, body, closing, fields)


TOPICS = {"daily_life": _daily_life, "science": _science, "story": _story, "weather": _weather,
          "travel": _travel, "cooking": _cooking, "work": _work, "numbers_and_dates": _numbers_and_dates,
          "school": _school, "sport_and_home": _sport_and_home}


# ----------------------------------------------------------------------------- public API
def generate_corpus(num_documents: int, seed: int = 0) -> list[str]:
    """``num_documents`` paragraphs of English prose; the same seed gives the same list."""
    if num_documents < 0:
        raise InputError(f"num_documents must be >= 0, got {num_documents}")
    rng = random.Random(seed)
    topics = list(TOPICS.values())
    return [rng.choice(topics)(rng) for _ in range(num_documents)]


BUNDLED_DOCUMENTS = {"corpus": (10_000, 0), "corpus_heldout": (500, 1)}  # name -> (documents, seed)


def bundled_documents(name: str, text_field: str = "text") -> list[dict[str, str]]:
    """A named bundled document set as rows ``{text_field: paragraph}``: ``corpus`` (pre-training) or
    ``corpus_heldout`` (other seed, for held-out loss)."""
    if name not in BUNDLED_DOCUMENTS:
        raise InputError(f"{name!r} is not a bundled document set; choose from {sorted(BUNDLED_DOCUMENTS)}")
    count, seed = BUNDLED_DOCUMENTS[name]
    return [{text_field: text} for text in generate_corpus(count, seed)]


def corpus_stats(texts: list[str]) -> dict[str, int]:
    """Counts for the module docstring: documents, words (split on whitespace) and unique words
    (lowercased, keeping only letters, digits, apostrophes and hyphens)."""
    words = [word for text in texts for word in text.split()]
    unique = {re.sub(r"[^a-z0-9'-]", "", word.lower()) for word in words} - {""}
    return {"documents": len(texts), "words": len(words), "unique_words": len(unique)}


def write_corpus(path: str | Path, num_documents: int, seed: int = 0) -> Path:
    """Write ``generate_corpus(num_documents, seed)`` as JSONL, one ``{"text": ...}`` per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text in generate_corpus(num_documents, seed):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path
