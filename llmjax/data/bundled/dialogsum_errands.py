"""Errands, work and leisure scenarios for the DialogSum-shaped generator (the rest are in
`dialogsum_scenarios.py`): post office, gym, car repair, haircut, directions, groceries, billing,
meetings, films. Same contract: `(Draw) -> (Turns, summary)`, the summary states the outcome.
"""

from __future__ import annotations

from llmjax.data.bundled.dialogsum_words import (
    CITIES, WEEKDAYS, Draw, Turns, article, counted, dollars, number_words, scenario_registry,
)

SCENARIOS, scenario = scenario_registry()


@scenario("post office")
def post_office(d: Draw):
    city, kilos = d.pick(CITIES), d.num(1, 8)
    standard, express = kilos * d.num(4, 6), kilos * d.num(9, 12)
    standard_days, express_days = d.num(6, 10), d.num(1, 3)
    urgent = d.chance(0.5)
    t = Turns()
    t.p2(d.pick([f"I'd like to send this package to {city}.", f"Hello, how much is it to mail this parcel to {city}?"]))
    t.p1(d.pick(["Please put it on the scale.", "Let me weigh it first."]))
    t.p1(d.pick([f"It's {number_words(kilos)} kilos. Standard post is {d.say_money(standard)} and takes {number_words(standard_days)} days.",
                 f"{number_words(kilos).capitalize()} kilograms. By regular mail that's {d.say_money(standard)}, about {number_words(standard_days)} days."]))
    t.p1(d.pick([f"Express costs {d.say_money(express)} and arrives in {counted(express_days, 'day')}.", f"Or express: {d.say_money(express)}, {counted(express_days, 'day')}."]))
    if urgent:
        t.p2(d.pick(["It's my daughter's birthday present and the party is this weekend, so express.", "It has to arrive this week. Express, please."]))
        cost, days, how = express, express_days, "by express"
    else:
        t.p2(d.pick(["There's no rush. Standard is fine.", "It's not urgent, I'll take the cheaper one."]))
        cost, days, how = standard, standard_days, "by standard post"
    t.p1(d.pick(["Would you like insurance?", "Anything fragile inside?"]))
    t.p2(d.pick(["No, thanks.", "Just some clothes, nothing fragile."]))
    summary = d.summarize([f"#Person2# sends a {kilos}-kilo package to {city} {how} for {dollars(cost)}; it should arrive in {counted(days, 'day')}.",
                           f"#Person1# weighs #Person2#'s parcel for {city} and #Person2# chooses to send it {how}, paying {dollars(cost)}."],
                           f"#Person2# pays {dollars(cost)} to send a {kilos}-kilo parcel to {city} {how}; it will take {counted(days, 'day')}.")
    return t, summary


@scenario("gym membership")
def gym_membership(d: Draw):
    monthly = d.num(30, 60, 5)
    annual = monthly * 12 - d.num(60, 150, 10)
    long_term = d.chance(0.5)
    t = Turns()
    t.p2(d.pick(["Hi, I'm interested in joining the gym.", "Hello, what kind of memberships do you have?"]))
    t.p1(d.pick([f"We have a monthly plan at {d.say_money(monthly)} and an annual plan at {d.say_money(annual)}.",
                 f"You can pay {d.say_money(monthly)} each month, or {d.say_money(annual)} for the whole year."]))
    t.p2(d.pick(["Does it include classes?", "Can I use the pool too?"]))
    t.p1(d.pick(["Yes, everything is included.", "Yes, all facilities are included in both plans."]))
    if long_term:
        t.p2(d.pick(["I'm going to live here for at least two years, so I'll take the annual one.", "I plan to train all year. Annual, please."]))
        outcome = f"the annual plan for {dollars(annual)}, saving {dollars(monthly * 12 - annual)} compared with paying monthly"
    else:
        t.p2(d.pick(["I'm only in town for the summer, so the monthly one.", "I'm moving away in a few months. Monthly, please."]))
        outcome = f"the monthly plan at {dollars(monthly)} because #Person2# is staying only a short time"
    t.p1(d.pick(["Great. Please fill in this form.", "Welcome aboard! Here's your card."]))
    summary = d.summarize([f"#Person2# joins #Person1#'s gym and chooses {outcome}.", f"#Person1# explains the gym's two plans, and #Person2# signs up for {outcome}."],
                           f"After hearing about the gym's plans, #Person2# picks {outcome}.")
    return t, summary


@scenario("car repair")
def car_repair(d: Draw):
    noise, part = d.pick([("there's a squeaking sound when I brake", "brake pads"), ("the engine won't start on cold mornings", "battery"),
                          ("the car pulls to the left", "front tires"), ("there's smoke coming from the engine", "radiator hose")])
    parts, labor = d.num(60, 300, 10), d.num(40, 150, 10)
    ready = d.time(14, 18)
    t = Turns()
    t.p1(d.pick(["What seems to be the trouble with your car?", "Morning! What can I do for you?"]))
    t.p2(d.pick([f"Well, {noise}.", f"I'm worried because {noise}."]))
    t.p1(d.pick(["Let me take a look.", "Leave it with me for a minute."]))
    t.p1(d.pick([f"You need new {part}. The parts are {d.say_money(parts)} and the labor is {d.say_money(labor)}.",
                 f"The {part} must be replaced: {d.say_money(parts)} for parts plus {d.say_money(labor)} for the work."]))
    t.p2(d.pick(["When can it be ready?", "How long will it take?"]))
    t.p1(d.pick([f"By {d.say_time(ready)} today.", f"Come back at {d.say_time(ready)}."]))
    t.p2(d.pick(["Fine, go ahead.", "OK, please do it."]))
    summary = d.summarize([f"#Person1# finds that #Person2#'s car needs new {part}. The repair costs {dollars(parts + labor)} and will be ready at {ready.written()}.",
                           f"#Person2# brings the car in; #Person1# will replace the {part} for {dollars(parts + labor)} in total by {ready.written()}."],
                           f"#Person2#'s car needs new {part}; #Person1# will have it ready by {ready.written()} for {dollars(parts + labor)}.")
    return t, summary


@scenario("haircut appointment")
def haircut_appointment(d: Draw):
    name, stylist = d.name(), d.name()
    day = d.pick(WEEKDAYS[:6])
    other = d.pick([w for w in WEEKDAYS[:6] if w != day])
    slot = d.time(10, 17)
    price = d.num(20, 70, 5)
    t = Turns()
    t.p1(d.pick(["Style Studio, good afternoon.", "Hello, Hair Corner. How can I help?"]))
    t.p2(d.pick([f"Hi, I'd like to make an appointment with {stylist} for a haircut on {other}.", f"Can I book {stylist} for {other}?"]))
    t.p1(d.pick([f"{stylist} doesn't work on {other}s, I'm afraid. {stylist} is free on {day} at {d.say_time(slot)}.",
                 f"Sorry, {stylist} is off on {other}. How about {day}, at {d.say_time(slot)}?"]))
    t.p2(d.pick(["OK, that works. How much is a cut?", "That's fine. What's the price?"]))
    t.p1(d.pick([f"{d.say_money(price)} including a wash.", f"It's {d.say_money(price)}."]))
    t.p1("And your name, please?")
    t.p2(f"{name}. Thank you.")
    summary = d.summarize([f"{name} books a {dollars(price)} haircut with {stylist} on {day} at {slot.written()}, because {stylist} doesn't work on {other}.",
                           f"#Person2# wants a haircut with {stylist} on {other}, but #Person1# books {day} at {slot.written()} instead; it costs {dollars(price)}."],
                           f"{stylist} doesn't work on {other}, so #Person2# gets a {dollars(price)} haircut with {stylist} on {day} at {slot.written()}.")
    return t, summary


@scenario("ask for directions")
def ask_for_directions(d: Draw):
    place = d.pick(["the train station", "the museum", "the post office", "the city library", "the nearest bank"])
    landmark = d.pick(["the church", "a big supermarket", "the traffic lights", "the fountain", "a gas station"])
    blocks, turn = d.num(2, 5), d.pick(["left", "right"])
    walk = d.num(10, 30, 5)
    t = Turns()
    t.p2(d.pick([f"Excuse me, could you tell me how to get to {place}?", f"Sorry to bother you, is {place} near here?"]))
    t.p1(d.pick([f"Sure. Go straight for {number_words(blocks)} blocks until you see {landmark}.", f"Walk {number_words(blocks)} blocks down this street to {landmark}."]))
    t.p1(d.pick([f"Then turn {turn}, and it's on your {'left' if turn == 'right' else 'right'}.", f"Turn {turn} there, you can't miss it."]))
    t.p2(d.pick(["Is it far?", "Can I walk there?"]))
    bus = walk >= 20 and d.chance(0.6)
    if bus:
        t.p1(d.pick([f"About {number_words(walk)} minutes on foot. You could take the number {blocks + 10} bus instead.", f"It's a {number_words(walk)}-minute walk, but the bus is quicker."]))
        t.p2(d.pick(["I'll take the bus then. Thanks!", "The bus sounds better. Thank you."]))
        outcome = "#Person2# decides to take the bus"
    else:
        t.p1(d.pick([f"Not really, maybe {number_words(walk)} minutes.", f"It's about {number_words(walk)} minutes' walk."]))
        t.p2(d.pick(["Great, thank you very much.", "Thanks a lot!"]))
        outcome = f"it's about a {walk}-minute walk"
    summary = d.summarize([f"#Person1# tells #Person2# the way to {place}: {number_words(blocks)} blocks to {landmark}, then turn {turn}; {outcome}.",
                           f"#Person2# asks for directions to {place}. #Person1# explains the route past {landmark}, and {outcome}."],
                           f"To get to {place}, #Person2# should go {number_words(blocks)} blocks to {landmark} and turn {turn}; {outcome}.")
    return t, summary


@scenario("grocery shopping")
def grocery_shopping(d: Draw):
    dish = d.pick(["spaghetti", "a chicken salad", "pancakes", "vegetable soup", "tacos"])
    have, need = d.sample(["eggs", "milk", "tomatoes", "onions", "cheese", "flour", "rice", "carrots", "butter", "lettuce"], 2), None
    need = d.sample([x for x in ["garlic", "lemons", "bread", "chicken", "potatoes", "peppers"]], 2)
    guests = d.num(2, 6)
    t = Turns()
    t.p1(d.pick([f"Let's make {dish} tonight. We have {number_words(guests)} guests coming.", f"What about {dish} for dinner? {number_words(guests).capitalize()} friends are coming."]))
    t.p2(d.pick(["Good idea. What do we need?", "Sure. Do we have everything?"]))
    t.p1(d.pick([f"We still have {have[0]} and {have[1]} in the fridge.", f"There are {have[0]} and some {have[1]} at home."]))
    t.p2(d.pick([f"But we're out of {need[0]}, and I used the last {need[1]} yesterday.", f"We need {need[0]}. Oh, and {need[1]}, we don't have any left."]))
    t.p1(d.pick(["I'll go to the supermarket then. Anything else?", "OK, I'll pop out to the shop."]))
    t.p2(d.pick(["Maybe a bottle of wine for the guests.", "Some dessert would be nice."]))
    summary = d.summarize([f"#Person1# and #Person2# plan to cook {dish} for {number_words(guests)} guests. They have {have[0]} and {have[1]}, so #Person1# will buy {need[0]} and {need[1]}.",
                           f"Before cooking {dish} for their guests, #Person1# and #Person2# check what's missing: #Person1# goes out to buy {need[0]} and {need[1]}."],
                           f"#Person1# will buy {need[0]} and {need[1]} for the {dish} they are cooking for {number_words(guests)} guests, since they already have {have[0]} and {have[1]}.")
    return t, summary


@scenario("billing complaint")
def billing_complaint(d: Draw):
    service = d.pick(["phone", "internet", "electricity", "cable TV"])
    usual, charged = d.num(30, 80), None
    charged = usual + d.num(20, 90)
    refund = d.chance(0.6)
    t = Turns()
    t.p1(d.pick(["Customer service, Kelly speaking.", "Thank you for calling. How may I help you?"]))
    t.p2(d.pick([f"Hi, my {service} bill this month is {d.say_money(charged)}, but I usually pay {d.say_money(usual)}.",
                 f"I'm calling about my {service} bill. It says {d.say_money(charged)}! Normally it's around {d.say_money(usual)}."]))
    t.p1(d.pick(["Let me look at your account.", "I'm sorry about that. Let me check."]))
    if refund:
        t.p1(d.pick(["You're right, you were charged for a service you didn't order.", "I see the problem: an extra package was added by mistake."]))
        t.p1(d.pick(["The difference will be taken off your next bill.", "We'll refund the extra amount next month."]))
        t.p2(d.pick(["Thank you for sorting it out.", "Good, thank you."]))
        outcome = f"#Person1# finds a billing mistake and will credit the extra {dollars(charged - usual)} on the next bill"
    else:
        t.p1(d.pick(["It seems you used a lot more data than usual this month.", "Your usage was much higher than normal this month."]))
        t.p2(d.pick(["Really? I had no idea. I'll be more careful.", "Oh, my son was home for the holidays. That explains it."]))
        outcome = "#Person1# explains that the higher amount comes from heavier usage, so there is no refund"
    summary = d.summarize([f"#Person2# complains that the {service} bill is {dollars(charged)} instead of about {dollars(usual)}; {outcome}.",
                           f"#Person2# calls #Person1# about an unusually high {service} bill, and {outcome}."],
                           f"#Person2#'s {service} bill is {dollars(charged)}, far above the usual {dollars(usual)}; {outcome}.")
    return t, summary


@scenario("meeting schedule")
def meeting_schedule(d: Draw):
    client = d.pick(["the clients from " + d.pick(CITIES), "the marketing team", "our new supplier", "the board"])
    day = d.pick(WEEKDAYS[:5])
    new_day = d.pick([w for w in WEEKDAYS[:5] if w != day])
    reason = d.pick([("Their flight was cancelled.", "their flight was cancelled"), ("The director will be away that day.", "the director is away"),
                     ("The report isn't finished yet.", "the report isn't ready")])
    task = d.pick([("prepare the slides", "prepare the slides"), ("book a meeting room", "book a room"), ("print the contracts", "print the contracts")])
    t = Turns()
    t.p1(d.pick([f"Have you heard? The meeting with {client} on {day} is off.", f"I'm afraid we have to move the {day} meeting with {client}."]))
    t.p2(d.pick(["Oh, why?", "What happened?"]))
    t.p1(reason[0])
    t.p2(d.pick(["So when is it now?", "Has a new date been set?"]))
    t.p1(d.pick([f"{new_day} morning, same time.", f"They suggested {new_day}."]))
    t.p2(d.pick(["That gives us more time. Anything I should do?", "OK. What do you need from me?"]))
    t.p1(d.pick([f"Could you {task[0]}?", f"Please {task[0]} before then."]))
    t.p2(d.pick(["No problem.", "Sure, I'll do it tomorrow."]))
    summary = d.summarize([f"#Person1# tells #Person2# that the meeting with {client} moves from {day} to {new_day} because {reason[1]}; #Person2# will {task[1]}.",
                           f"The meeting with {client} is postponed to {new_day} since {reason[1]}, and #Person1# asks #Person2# to {task[1]}."],
                           f"Because {reason[1]}, the meeting with {client} moves from {day} to {new_day}, and #Person2# will {task[1]}.")
    return t, summary


@scenario("movie night")
def movie_night(d: Draw):
    genres = ["horror film", "romantic comedy", "action movie", "science fiction film", "documentary"]
    offered, chosen = d.sample(genres, 2)
    start, tickets = d.time(18, 21), d.num(8, 15)
    meet = d.pick(["the cinema entrance", "the coffee shop next to the cinema", "the bus stop"])
    t = Turns()
    t.p1(d.pick(["Do you want to see a movie tonight?", "Fancy going to the cinema tonight?"]))
    t.p2(d.pick(["Sure! What's on?", "Why not. What are you thinking of?"]))
    t.p1(d.pick([f"There's a new {offered} everyone's talking about.", f"How about that new {offered}?"]))
    t.p2(d.pick([f"Hmm, I'm not in the mood for {article(offered)}. Is there {article(chosen)}?", f"I'd rather watch {article(chosen)}."]))
    t.p1(d.pick([f"Yes, there's one at {d.say_time(start)}. Tickets are {d.say_money(tickets)}.", f"One starts at {d.say_time(start)}, {d.say_money(tickets)} a ticket."]))
    payer = d.pick(["#Person1#", "#Person2#"])
    t.p2(d.pick(["Perfect. I'll buy the tickets online.", "Great, the tickets are on me."]) if payer == "#Person2#" else "Great. Can you get the tickets?")
    if payer == "#Person1#":
        t.p1("Sure, I'll book them now.")
    t.p1(d.pick([f"Let's meet at {meet} twenty minutes before.", f"See you at {meet}."]))
    summary = d.summarize([f"#Person1# and #Person2# will see {article(chosen)} at {start.written()} instead of the {offered} #Person1# suggested; {payer} buys the {dollars(tickets)} tickets and they meet at {meet}.",
                           f"#Person2# turns down the {offered}, so they choose {article(chosen)} at {start.written()}. {payer} gets the tickets."],
                           f"Instead of the {offered}, #Person1# and #Person2# go to {article(chosen)} at {start.written()}; {payer} pays {dollars(tickets)} for the tickets and they meet at {meet}.")
    return t, summary
