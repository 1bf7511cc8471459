"""Everyday scenarios (shopping, health, work, travel, food, housing, school...) for the DialogSum-shaped
generator: one function per topic; `dialogsum_errands.py` holds the rest.

Each scenario draws its facts (names, places, times, prices, quantities), writes a dialogue whose
turns each come from several phrasings, and a third-person summary ("#Person2# books ...") that
states the outcome: an agreed time after a first proposal fails, a total computed from a price and
a quantity, a decision that follows a condition stated turns earlier. `SCENARIOS` maps the topic
label to its function `(Draw) -> (Turns, summary)`.
"""

from __future__ import annotations

from llmjax.data.bundled.dialogsum_words import (
    CITIES, COLORS, COMPANIES, WEEKDAYS, Draw, Turns, article, counted, dollars, number_words, scenario_registry,
)

SCENARIOS, scenario = scenario_registry()


@scenario("shopping")
def shopping(d: Draw):
    item, items = d.pick([("sweater", "sweaters"), ("jacket", "jackets"), ("scarf", "scarves"), ("shirt", "shirts"),
                          ("dress", "dresses"), ("coat", "coats"), ("hat", "hats"), ("skirt", "skirts")])
    color, size = d.pick(COLORS), d.pick(["small", "medium", "large", "extra large"])
    price = d.num(20, 120, 5)
    t = Turns()
    t.p1(d.pick(["Good afternoon. Can I help you?", "Hello! Are you looking for anything special today?",
                 "Hi, welcome in. Let me know if you need any help."]))
    t.p2(d.pick([f"Yes, I'd like to see {article(color)} {item}.", f"I'm looking for {article(item)}. Do you have any in {color}?",
                 f"Actually, yes. I need {article(color)} {item} for {d.pick(['work', 'my trip to ' + d.pick(CITIES), 'a wedding'])}."]))
    t.p1(d.pick([f"Sure, we have this one in {color}. What size do you wear?", f"Of course. Here's a nice {color} one. Which size?"]))
    t.p2(d.pick([f"{size.capitalize()}, I think. How much is it?", f"{size.capitalize()}, please. What does it cost?"]))
    t.p1(d.pick([f"It's {d.say_money(price)}.", f"This one is {d.say_money(price)}.", f"It's {d.say_money(price)}, it's very popular this season."]))
    outcome = d.pick(["discount", "sold_out", "buy"])
    if outcome == "discount":
        pct, qty = d.pick([10, 20, 25]), d.num(2, 3)
        total = qty * price * (100 - pct) / 100
        t.p2(d.pick(["That's a bit expensive. Can you give me a discount?", "Hmm, that's more than I wanted to spend. Any chance of a discount?"]))
        t.p1(d.pick([f"If you buy {number_words(qty)}, I can take {pct} percent off.", f"Well, we give {pct} percent off when you take {number_words(qty)} or more."]))
        t.p2(d.pick([f"All right, then I'll take {number_words(qty)}.", f"OK, {number_words(qty)} it is. My brother needs one too."]))
        summary = d.summarize([f"#Person2# buys {number_words(qty)} {color} {items} for {dollars(total)} after #Person1# offers {pct}% off for buying more than one.",
                               f"#Person2# finds the {color} {item} too expensive, so #Person1# gives a {pct}% discount on {number_words(qty)} of them; #Person2# pays {dollars(total)}."],
                               f"After a {pct}% discount for taking {number_words(qty)}, #Person2# pays {dollars(total)} for the {color} {items}.")
    elif outcome == "sold_out":
        other = d.pick([c for c in COLORS if c != color])
        t.p2("That's fine. Could I try it on?")
        t.p1(d.pick([f"I'm sorry, we've just sold the last {size} one in {color}. We still have it in {other}.",
                     f"Oh, I'm afraid we're out of {size} in {color}. Would {other} do?"]))
        t.p2(d.pick([f"No, I really wanted {color}. I'll come back next week.", f"{other.capitalize()} doesn't suit me. I'll try another shop, thanks."]))
        summary = d.summarize([f"#Person2# wants {article(color)} {item} in {size} but leaves without buying anything because that size is sold out.",
                               f"#Person2# likes the {dollars(price)} {item}, but the {color} one is no longer available in {size}, and #Person2# refuses the {other} one."],
                               f"#Person2# buys nothing: the {color} {item} is sold out in {size}.")
    else:
        pay = d.pick(["card", "cash"])
        t.p2(d.pick(["That's reasonable. I'll take it.", "Great, that fits my budget. I'll have it."]))
        t.p1(d.pick(["How would you like to pay?", "Will that be cash or card?"]))
        t.p2("By card, please." if pay == "card" else "I'll pay in cash.")
        summary = d.summarize([f"#Person2# buys {article(size)} {color} {item} for {dollars(price)} and pays by {pay}.",
                               f"#Person1# helps #Person2# find {article(color)} {item}; #Person2# pays {dollars(price)} for it in {pay}."],
                               f"#Person2# pays {dollars(price)} by {pay} for {article(color)} {item} in {size}.")
    return t, summary


@scenario("see a doctor")
def see_a_doctor(d: Draw):
    symptom, illness, advice = d.pick([
        ("a terrible headache", "a migraine", "avoid screens and sleep more"),
        ("a sore throat and a cough", "a throat infection", "drink plenty of warm water"),
        ("pain in my stomach after meals", "a stomach problem", "eat light food for a while"),
        ("a runny nose and a fever", "the flu", "stay in bed and rest"),
        ("pain in my lower back", "a strained muscle", "stop lifting heavy things"),
    ])
    days, times = d.num(2, 6), d.num(2, 3)
    t = Turns()
    t.p1(d.pick(["Good morning. What seems to be the problem?", "Hello, please sit down. What brings you here today?"]))
    t.p2(d.pick([f"I've had {symptom} for {number_words(days)} days.", f"Doctor, I've been suffering from {symptom} since {number_words(days)} days ago."]))
    t.p1(d.pick(["I see. Have you taken anything for it?", "Have you tried any medicine yet?"]))
    t.p2(d.pick(["Only some aspirin, but it didn't help much.", "No, I wanted to see you first.", "Some pills from the drugstore, but nothing changed."]))
    if d.chance(0.5):
        t.p1("Let me check your temperature. Hmm, it's a little high.")
        t.p2("Is it serious?")
    t.p1(d.pick([f"Don't worry, it's {illness}. Take this medicine {number_words(times)} times a day.",
                 f"It looks like {illness}. I'll prescribe some medicine; take it {number_words(times)} times a day after meals."]))
    t.p2(d.pick(["Is there anything else I should do?", "Anything else?"]))
    t.p1(d.pick([f"Yes, {advice}. Come back if you don't feel better in a week.", f"You should {advice}, and see me again if it gets worse."]))
    t.p2(d.pick(["Thank you, doctor.", "I will. Thanks a lot."]))
    summary = d.summarize([f"#Person2# has been unwell for {number_words(days)} days. #Person1# diagnoses {illness}, prescribes medicine {number_words(times)} times a day and advises #Person2# to {advice}.",
                           f"#Person1# tells #Person2#, who has had symptoms for {number_words(days)} days, that it is {illness}, and recommends medicine and to {advice}."],
                           f"#Person1# finds that #Person2# has {illness}, prescribes medicine to take {number_words(times)} times a day and tells #Person2# to {advice}.")
    return t, summary


@scenario("job interview")
def job_interview(d: Draw):
    name = d.name()
    position = d.pick(["sales manager", "accountant", "software engineer", "nurse", "secretary", "graphic designer", "marketing assistant"])
    company, years = d.pick(COMPANIES), d.num(2, 9)
    salary = d.num(35, 95, 5) * 1000
    day = d.pick(WEEKDAYS[:5])
    t = Turns()
    t.p1(d.pick([f"Good morning. You must be {name}. Please have a seat.", f"Thanks for coming in, {name}. Shall we begin?"]))
    t.p2(d.pick(["Thank you. I'm glad to be here.", "Yes, thank you for having me."]))
    t.p1(d.pick([f"Why are you interested in the {position} position?", f"What makes you want to work here as {article(position)}?"]))
    t.p2(d.pick(["I've heard your company values its people, and I want a job with more responsibility.",
                 "I'd like to work for a bigger company where I can keep learning."]))
    t.p1(d.pick(["Tell me about your experience.", "How much experience do you have?"]))
    t.p2(d.pick([f"I worked at {company} for {number_words(years)} years.", f"I've been at {company} for {number_words(years)} years, doing similar work."]))
    t.p1(d.pick(["And what salary do you expect?", "What are your salary expectations?"]))
    t.p2(d.pick([f"About {number_words(salary // 1000)} thousand dollars a year.", f"I'm hoping for {salary // 1000} thousand a year."]))
    hired = d.chance(0.5)
    if hired:
        t.p1(d.pick([f"That's within our range. Could you come back on {day} to meet the director?", f"That sounds fine. Let's arrange a second interview on {day}."]))
        t.p2(d.pick([f"{day} is perfect. Thank you!", "Sure, I'll be there."]))
        outcome = f"#Person1# invites {name} to a second interview on {day}"
    else:
        t.p1(d.pick(["Hmm, that's higher than we planned for this role. We'll let you know.", "I'm afraid that's above our budget, but we'll be in touch."]))
        t.p2(d.pick(["I understand. Thank you for your time.", "I see. I hope to hear from you."]))
        outcome = f"#Person1# says {name}'s salary expectation is too high for the budget"
    summary = d.summarize([f"{name} interviews for the {position} job. {name} has {number_words(years)} years of experience at {company} and expects {dollars(salary)} a year. {outcome}.",
                           f"#Person1# interviews {name} for {article(position)} position; {name} worked at {company} for {number_words(years)} years and wants {dollars(salary)} a year, and {outcome}."],
                           f"{name} applies for the {position} job after {number_words(years)} years at {company} and asks for {dollars(salary)} a year; {outcome}.")
    return t, summary


@scenario("book a flight")
def book_a_flight(d: Draw):
    city, day = d.pick(CITIES), d.pick(WEEKDAYS)
    early, late = d.time(6, 10), d.time(14, 20)
    early_price, late_price = d.num(250, 600, 10), d.num(150, 240, 10)
    needs_early = d.chance(0.5)
    seat = d.pick(["window", "aisle"])
    t = Turns()
    t.p1(d.pick(["Global Travel, how can I help you?", "Good morning, travel agency. What can I do for you?"]))
    t.p2(d.pick([f"I'd like to book a flight to {city} for this {day}.", f"Do you have any flights to {city} on {day}?"]))
    if needs_early:
        t.p2(d.pick(["I have a meeting there at lunchtime, so I need to arrive before noon.", "I must be there by midday."]))
    else:
        t.p2(d.pick(["I'm not in a hurry, but I'm on a tight budget.", "The time doesn't matter much, but I want the cheapest option."]))
    t.p1(d.pick([f"There's one at {d.say_time(early)} for {d.say_money(early_price)}, and another at {d.say_time(late)} for {d.say_money(late_price)}.",
                 f"Let me see... one leaves at {d.say_time(early)} and costs {d.say_money(early_price)}. The {d.say_time(late)} flight is {d.say_money(late_price)}."]))
    chosen, cost = (early, early_price) if needs_early else (late, late_price)
    t.p2(d.pick(["Then I'll take the first one." if needs_early else "I'll take the cheaper one, then.",
                 "The earlier one, please." if needs_early else "The later one is fine for me."]))
    t.p1(d.pick(["Window or aisle seat?", "Would you prefer a window or an aisle seat?"]))
    t.p2(d.pick([f"{seat.capitalize()}, please.", f"I'd like {article(seat)} seat."]))
    t.p1(d.pick(["Done. Your ticket will be emailed to you.", "All set. Have a nice trip!"]))
    reason = "to arrive before noon" if needs_early else "because it is cheaper"
    summary = d.summarize([f"#Person2# books a flight to {city} on {day} leaving at {chosen.written()} for {dollars(cost)} {reason}, with {article(seat)} seat.",
                           f"#Person1# helps #Person2# book {article(seat)} seat on the {chosen.written()} flight to {city} on {day}, which costs {dollars(cost)}; #Person2# chooses it {reason}."],
                           f"#Person2# takes the {chosen.written()} flight to {city} on {day} {reason}; the ticket with {article(seat)} seat costs {dollars(cost)}.")
    return t, summary


@scenario("order food")
def order_food(d: Draw):
    dishes = [("steak", 24), ("grilled salmon", 21), ("chicken curry", 16), ("mushroom risotto", 15), ("beef burger", 13), ("vegetable pasta", 12)]
    (special, special_price), (dish, dish_price) = d.sample(dishes, 2)
    drink, drink_price = d.pick([("orange juice", 4), ("a glass of red wine", 8), ("iced tea", 3), ("a beer", 6)])
    takes_special = d.chance(0.5)
    tip = d.pick([0, 5])
    t = Turns()
    t.p1(d.pick(["Are you ready to order, sir?", "Good evening. May I take your order?"]))
    t.p2(d.pick(["What do you recommend?", "What's good here tonight?"]))
    t.p1(d.pick([f"The {special} is our chef's special today.", f"Our {special} is very popular."]))
    if takes_special:
        t.p2(d.pick(["That sounds great, I'll have that.", "Perfect, I'll try it."]))
        food, food_price = special, special_price
    else:
        t.p2(d.pick([f"Hmm, I don't really feel like {special}. I'll have the {dish} instead.", f"I'm not a fan of {special}. The {dish}, please."]))
        food, food_price = dish, dish_price
    t.p1(d.pick(["Anything to drink?", "And what would you like to drink?"]))
    t.p2(d.pick([f"{drink.capitalize()}, please.", f"Just {drink}."]))
    total = food_price + drink_price + tip
    t.p1(d.pick([f"Here you are. The {food} is {d.say_money(food_price)} and the drink is {d.say_money(drink_price)}.",
                 f"Your bill: {d.say_money(food_price)} for the {food} and {d.say_money(drink_price)} for the drink."]))
    t.p2(f"Here you are. Keep the change, it's {d.say_money(tip)} extra for you." if tip else "Here you are, exactly.")
    summary = d.summarize([f"#Person2# orders the {food} and {drink}{' on #Person1#' + chr(39) + 's recommendation' if takes_special else ' instead of the recommended ' + special}, and pays {dollars(total)} in total.",
                           f"#Person2# has the {food} with {drink} at #Person1#'s restaurant; the meal costs {dollars(total)} {'including a tip' if tip else 'with no tip'}."],
                           f"#Person2# pays {dollars(total)} for the {food} and {drink}{', as #Person1# recommended' if takes_special else ''}.")
    return t, summary


@scenario("restaurant reservation")
def restaurant_reservation(d: Draw):
    name, people, day = d.name(), d.num(2, 8), d.pick(WEEKDAYS)
    first, second = d.time(18, 19), d.time(20, 21)
    t = Turns()
    t.p1(d.pick(["Good afternoon, Rose Garden Restaurant.", "Hello, this is Luigi's. How can I help?"]))
    t.p2(d.pick([f"I'd like to book a table for {number_words(people)} on {day}, at {d.say_time(first)}.",
                 f"Hi, can I reserve a table for {number_words(people)} people this {day} at {d.say_time(first)}?"]))
    t.p1(d.pick(["I'm sorry, we're fully booked at that time.", "Let me check... I'm afraid there's nothing free then."]))
    t.p1(d.pick([f"Would {d.say_time(second)} suit you?", f"We do have a table at {d.say_time(second)}, though."]))
    t.p2(d.pick(["That's a bit late, but all right.", "Fine, we'll come later then."]))
    t.p1(d.pick(["May I have your name, please?", "Under what name?"]))
    t.p2(d.pick([f"{name}. And could we have a table by the window?", f"It's {name}."]))
    t.p1(d.pick([f"Got it, {name}. See you on {day}.", "Your table is booked. Thank you for calling."]))
    summary = d.summarize([f"{name} calls to book a table for {number_words(people)} on {day}. The restaurant is full at {first.written()}, so they reserve for {second.written()}.",
                           f"#Person2# reserves a table for {number_words(people)} people at #Person1#'s restaurant on {day} at {second.written()} because {first.written()} is fully booked."],
                           f"#Person2# can't get a table for {number_words(people)} at {first.written()} on {day}, so #Person1# books one for {second.written()}.")
    return t, summary


@scenario("rent an apartment")
def rent_an_apartment(d: Draw):
    rooms, rent, months = d.num(1, 3), d.num(8, 25) * 100, d.num(1, 2)
    place = d.pick(["the subway station", "the university", "the central park", "a shopping mall", "the hospital"])
    day = d.pick(WEEKDAYS)
    budget = rent + d.pick([-300, 200])
    t = Turns()
    t.p1(d.pick(["Hello, Homefinder Agency. What kind of place are you looking for?", "Good morning. How can I help you?"]))
    t.p2(d.pick([f"I need {article(number_words(rooms))}-bedroom apartment.", f"I'm looking for a flat with {number_words(rooms)} bedroom{'s' if rooms > 1 else ''}."]))
    t.p2(d.pick([f"My budget is about {d.say_money(budget)} a month.", f"I can't pay more than {d.say_money(budget)} a month."]))
    t.p1(d.pick([f"There's a nice one near {place} for {d.say_money(rent)} a month.", f"We have one close to {place}. The rent is {d.say_money(rent)}."]))
    t.p2(d.pick(["Is there a deposit?", "Do I have to pay a deposit?"]))
    months_rent = "one month's rent" if months == 1 else f"{number_words(months)} months' rent"
    t.p1(d.pick([f"Yes, {months_rent}, paid in advance with the first month.",
                 f"The deposit is {counted(months, 'month')} of rent."]))
    move_in = rent * (months + 1)
    if rent <= budget:
        t.p2(d.pick([f"That works. Can I see it on {day}?", f"Sounds good. Could I have a look this {day}?"]))
        t.p1(d.pick([f"Of course, {day} is fine.", "Sure, I'll meet you there."]))
        summary = d.summarize([f"#Person2# wants {article(number_words(rooms))}-bedroom apartment. #Person1# offers one near {place} for {dollars(rent)} a month; moving in costs {dollars(move_in)} with the deposit, and they arrange a viewing on {day}.",
                               f"#Person1# shows #Person2# an affordable {number_words(rooms)}-bedroom flat near {place} at {dollars(rent)} a month, and #Person2# will view it on {day}."],
                               f"#Person2# will see the {number_words(rooms)}-bedroom apartment near {place} on {day}; the rent is {dollars(rent)} a month.")
    else:
        t.p2(d.pick(["Hmm, that's over my budget. Do you have anything cheaper?", "That's more than I can afford."]))
        t.p1(d.pick(["Not at the moment, but I'll call you if something comes up.", "I'll let you know when something cheaper is available."]))
        summary = d.summarize([f"#Person2# is looking for {article(number_words(rooms))}-bedroom apartment, but the one #Person1# offers near {place} costs {dollars(rent)} a month, above #Person2#'s budget of {dollars(budget)}.",
                               f"#Person1# can't find #Person2# an affordable flat: the {number_words(rooms)}-bedroom place near {place} is too expensive, so #Person1# will call when a cheaper one appears."],
                               f"The {number_words(rooms)}-bedroom apartment near {place} costs {dollars(rent)} a month, more than the {dollars(budget)} #Person2# can pay, so #Person2# doesn't take it.")
    return t, summary


@scenario("homework extension")
def homework_extension(d: Draw):
    subject = d.pick(["history", "biology", "economics", "literature", "chemistry", "math"])
    reason_said, reason_summary = d.pick([
        ("I've been in bed with a fever all week.", "was ill"),
        ("My laptop broke and I lost half of my work.", "lost work when the laptop broke"),
        ("My grandmother was in hospital and I had to look after her.", "had to care for a sick grandmother"),
        ("I had three exams this week and couldn't find the time.", "had too many exams"),
    ])
    day, granted = d.pick(WEEKDAYS[:5]), d.chance(0.6)
    t = Turns()
    t.p2(d.pick(["Excuse me, Professor, do you have a minute?", "Sorry to bother you, Ms. Smith. Can I talk to you?"]))
    t.p1(d.pick(["Of course. What is it?", "Sure, come in."]))
    t.p2(d.pick([f"It's about the {subject} essay. I don't think I can finish it on time.", f"I'm having trouble with the {subject} paper due tomorrow."]))
    t.p1(d.pick(["Why is that?", "What happened?"]))
    t.p2(reason_said)
    if granted:
        t.p1(d.pick([f"I'm sorry to hear that. You can hand it in on {day}.", f"All right. I'll give you until {day}, but not a day later."]))
        t.p2(d.pick(["Thank you so much!", "That's very kind of you."]))
        outcome = f"#Person1# extends the deadline to {day}"
    else:
        t.p1(d.pick(["I'm afraid the deadline is fixed for everyone. Hand in what you have.", "I can't make exceptions. Please submit it tomorrow."]))
        t.p2(d.pick(["I understand. I'll do my best.", "OK, I'll try to finish tonight."]))
        outcome = "#Person1# refuses and keeps the original deadline"
    summary = d.summarize([f"#Person2# asks #Person1# for more time on the {subject} essay because #Person2# {reason_summary}. {outcome}.",
                           f"#Person2# {reason_summary} and requests an extension for the {subject} assignment; {outcome}."],
                           f"Because #Person2# {reason_summary}, #Person2# asks for an extension on the {subject} essay, and {outcome}.")
    return t, summary


@scenario("computer problem")
def computer_problem(d: Draw):
    device, problem, fix = d.pick([
        ("printer", "it keeps saying the paper is jammed, but there's no paper inside", "clean the paper sensor"),
        ("laptop", "it gets really hot and shuts down by itself", "update the system software"),
        ("router", "the internet connection drops every few minutes", "change the wireless channel"),
        ("phone", "the battery goes flat by lunchtime", "turn off the apps running in the background"),
    ])
    day, solved = d.pick(WEEKDAYS[:5]), d.chance(0.5)
    t = Turns()
    t.p1(d.pick(["Technical support, how can I help you?", "Thank you for calling the help desk."]))
    t.p2(d.pick([f"Hi, I have a problem with my {device}: {problem}.", f"My {device} is acting up. Basically, {problem}."]))
    t.p1(d.pick(["Have you tried turning it off and on again?", "Did you restart it?"]))
    t.p2(d.pick(["Yes, twice. It didn't help.", "Of course, that was the first thing I did."]))
    t.p1(d.pick([f"OK, then let's {fix}. I'll guide you.", f"Let's try to {fix}. Follow my instructions."]))
    if solved:
        t.p2(d.pick(["Done... oh, it seems to work now!", "All right... yes, it looks normal again."]))
        t.p1("Great. Call us if it happens again.")
        outcome = f"the problem is solved after they {fix}"
    else:
        t.p2(d.pick(["I did that, but nothing has changed.", "No, it's still the same."]))
        t.p1(d.pick([f"Then we'll send a technician. Is {day} OK?", f"I'll book a technician visit for {day}."]))
        t.p2("Yes, that's fine.")
        outcome = f"trying to {fix} doesn't work, so #Person1# arranges a technician visit on {day}"
    summary = d.summarize([f"#Person2# calls #Person1# about a faulty {device}; restarting it didn't help, and {outcome}.",
                           f"#Person1# helps #Person2# with a {device} problem: {outcome}."],
                           f"#Person2#'s {device} is faulty and a restart didn't fix it; {outcome}.")
    return t, summary


@scenario("sports plans")
def sports_plans(d: Draw):
    sport, place = d.pick([("tennis", "the park courts"), ("basketball", "the school gym"), ("badminton", "the sports center"),
                           ("football", "the field behind the library"), ("table tennis", "the community club")])
    day = d.pick(WEEKDAYS)
    first, second = d.time(9, 12), d.time(15, 18)
    excuse = d.pick(["I have a dentist appointment", "I promised to help my mother", "I have a class", "I work until lunch"])
    t = Turns()
    t.p1(d.pick([f"Hey, do you want to play {sport} this {day}?", f"Are you free on {day}? Let's play some {sport}."]))
    t.p2(d.pick(["Sounds fun! What time?", "Sure, I haven't played for ages. When?"]))
    t.p1(d.pick([f"How about {d.say_time(first)}?", f"Maybe {d.say_time(first)}?"]))
    t.p2(d.pick([f"That's too early for me, {excuse}. Can we play later?", f"Sorry, {excuse} then. Is the afternoon OK?"]))
    t.p1(d.pick([f"Then let's say {d.say_time(second)}.", f"OK, {d.say_time(second)} then."]))
    t.p2(d.pick([f"Perfect. Where shall we meet?", "Great. Where?"]))
    t.p1(d.pick([f"At {place}. I'll bring the ball." if sport in ("basketball", "football") else f"At {place}. I'll bring the rackets.",
                 f"Let's meet at {place}."]))
    if d.chance(0.5):
        t.p2("The loser buys drinks afterwards!")
        t.p1("Deal.")
    summary = d.summarize([f"#Person1# and #Person2# will play {sport} at {place} on {day} at {second.written()}, since #Person2# is busy at {first.written()}.",
                           f"#Person1# invites #Person2# to play {sport} on {day}. They move the game to {second.written()} because #Person2# can't come earlier, and meet at {place}."],
                           f"Since #Person2# is busy at {first.written()}, #Person1# and #Person2# agree to play {sport} at {place} on {day} at {second.written()}.")
    return t, summary


@scenario("weather")
def weather(d: Draw):
    plan = d.pick(["picnic", "hike", "bike ride", "barbecue", "trip to the beach"])
    bad, day = d.pick(["rain", "a storm", "snow", "strong winds"]), d.pick(WEEKDAYS[5:] + WEEKDAYS[:5])
    later = d.pick([w for w in WEEKDAYS if w != day])
    alternative = d.pick(["visit the museum", "see a film", "go bowling"])
    t = Turns()
    t.p1(d.pick(["Lovely weather today, isn't it?", "What a beautiful morning!", "It's so warm today."]))
    t.p2(d.pick(["Yes, but I heard it's going to change.", "It is. Enjoy it while it lasts."]))
    t.p1(d.pick(["Really? What does the forecast say?", "Why, have you seen the forecast?"]))
    t.p2(d.pick([f"They say there'll be {bad} on {day}.", f"The radio said to expect {bad} this {day}."]))
    t.p1(d.pick([f"Oh no, that's the day of our {plan}!", f"But we planned our {plan} for {day}!"]))
    if d.chance(0.5):
        t.p2(d.pick([f"Let's do it on {later} instead.", f"We could put it off until {later}."]))
        t.p1(d.pick(["Good idea, I'll tell the others.", "Fine, I hope it's sunny then."]))
        outcome = f"they move their {plan} to {later}"
    else:
        t.p2(d.pick([f"Why don't we {alternative} instead?", f"Maybe we could {alternative} instead."]))
        t.p1(d.pick(["Better than getting wet. Let's do that.", "OK, that's a good plan B."]))
        outcome = f"they cancel the {plan} and decide to {alternative}"
    summary = d.summarize([f"#Person1# and #Person2# chat about the weather. Because {bad} is forecast for {day}, {outcome}.",
                           f"#Person2# warns #Person1# about {bad} on {day}, so {outcome}."],
                           f"#Person1# and #Person2# hear that {bad} is coming on {day}, so {outcome}.")
    return t, summary


@scenario("birthday party")
def birthday_party(d: Draw):
    friend = d.name()
    age, people = d.num(18, 40), d.num(3, 6)
    gift = d.pick(["a watch", "a camera", "concert tickets", "a leather bag", "a coffee machine"])
    share = d.num(10, 60, 5)
    price = share * people
    venue, day = d.pick(["a karaoke bar", "her favorite restaurant", "my place", "the rooftop cafe"]), d.pick(WEEKDAYS[4:])
    t = Turns()
    t.p1(d.pick([f"You know {friend}'s birthday is coming up? {friend} turns {number_words(age)}.", f"{friend} will be {number_words(age)} next week. Shall we do something?"]))
    t.p2(d.pick(["Let's throw a surprise party!", "How about a surprise party?"]))
    t.p1(d.pick([f"Great idea. We could have it at {venue} on {day}.", f"{venue.capitalize()} on {day} would be nice."]))
    t.p2(d.pick(["And what about a present?", "What should we get as a gift?"]))
    t.p1(d.pick([f"I saw {gift} for {d.say_money(price)}.", f"Maybe {gift}? It costs {d.say_money(price)}."]))
    t.p2(d.pick([f"That's a lot, but if all {number_words(people)} of us chip in, it's fine.", f"We can split it between the {number_words(people)} of us."]))
    t.p1(d.pick(["OK, I'll buy it and collect the money later.", "Good, I'll order it tonight."]))
    summary = d.summarize([f"#Person1# and #Person2# plan a surprise party for {friend}'s {age}th birthday at {venue.replace('my place', chr(35) + 'Person1#' + chr(39) + 's place')} on {day}. They'll give {gift}, with each of the {number_words(people)} friends paying {dollars(share)}.",
                           f"For {friend}'s {age}th birthday, #Person1# and #Person2# organize a surprise party on {day} and a shared gift of {gift}; split {number_words(people)} ways, each pays {dollars(share)}."],
                           f"#Person1# and #Person2# will throw {friend} a surprise party on {day} for turning {age}; the {number_words(people)} friends share the cost of {gift}, {dollars(share)} each.")
    return t, summary


@scenario("hotel check-in")
def hotel_check_in(d: Draw):
    name, nights = d.name(), d.num(2, 6)
    room, rate = d.pick([("single room", d.num(60, 110, 10)), ("double room", d.num(90, 160, 10)), ("suite", d.num(200, 350, 10))])
    breakfast = d.chance(0.5)
    t = Turns()
    t.p1(d.pick(["Good evening, welcome to the Grand Hotel.", "Hello, checking in?"]))
    t.p2(d.pick([f"Yes, I have a reservation under {name}.", f"Hi, the booking is under the name {name}."]))
    t.p1(d.pick([f"Let me see... {article(room)} for {number_words(nights)} nights, is that right?", f"Yes, here it is: {article(room)}, {number_words(nights)} nights."]))
    t.p2(d.pick(["That's right. How much is it per night?", "Correct. Remind me of the rate?"]))
    t.p1(d.pick([f"It's {d.say_money(rate)} a night.", f"The rate is {d.say_money(rate)} per night."]))
    t.p2(d.pick(["Is breakfast included?", "Does that include breakfast?"]))
    t.p1("Yes, it's served from seven to ten." if breakfast else "I'm afraid not; it's twelve dollars extra.")
    t.p1(d.pick(["Here is your key. The elevator is on your left.", "Your room is on the fifth floor. Enjoy your stay."]))
    summary = d.summarize([f"{name} checks in for {number_words(nights)} nights in {article(room)} at {dollars(rate)} a night, {dollars(rate * nights)} in total; breakfast is {'included' if breakfast else 'not included'}.",
                           f"#Person1# checks #Person2# into {article(room)} for {number_words(nights)} nights. The stay costs {dollars(rate * nights)}, {'with' if breakfast else 'without'} breakfast."],
                           f"#Person2# stays {number_words(nights)} nights in {article(room)} for {dollars(rate)} a night ({dollars(rate * nights)} in all), {'breakfast included' if breakfast else 'without breakfast'}.")
    return t, summary


@scenario("currency exchange")
def currency_exchange(d: Draw):
    currency, rate = d.pick([("euros", 0.9), ("pounds", 0.8), ("yen", 150.0), ("Canadian dollars", 1.35)])
    amount, fee = d.num(2, 10) * 100, d.pick([0, 5])
    received = f"{(amount - fee) * rate:,.2f}".removesuffix(".00")
    t = Turns()
    t.p1(d.pick(["Next, please. What can I do for you?", "Good morning. How may I help you?"]))
    t.p2(d.pick([f"I'd like to change some US dollars into {currency}.", f"Can I exchange dollars for {currency} here?"]))
    t.p1(d.pick([f"Certainly. Today's rate is {rate:g} {currency} to the dollar.", f"Sure. One dollar buys {rate:g} {currency} today."]))
    t.p2(d.pick([f"Good. Here are {d.say_money(amount)}.", f"I'll change {d.say_money(amount)}, please."]))
    t.p1(f"There's a {number_words(fee)}-dollar service fee, which I'll take from the amount." if fee else "There's no fee for this amount.")
    t.p2(d.pick(["OK, no problem.", "Fine."]))
    t.p1(d.pick(["Here you are. Please count it.", "Here's your money and the receipt."]))
    summary = d.summarize([f"#Person2# changes {dollars(amount)} into {currency} at #Person1#'s counter and receives {received} {currency}{' after a ' + dollars(fee) + ' fee' if fee else ''}.",
                           f"#Person1# exchanges {dollars(amount)} for #Person2# at a rate of {rate:g}; #Person2# gets {received} {currency}."],
                           f"#Person2# exchanges {dollars(amount)} and gets {received} {currency}{', a ' + dollars(fee) + ' fee deducted' if fee else ''}.")
    return t, summary


@scenario("lost property")
def lost_property(d: Draw):
    thing, contents = d.pick([("wallet", "my driver's license and about eighty dollars"), ("backpack", "my laptop and some books"),
                              ("phone", "all my photos"), ("umbrella", "nothing, but it was a gift"), ("purse", "my keys and credit cards")])
    place, found = d.pick(["the number 12 bus", "the train to " + d.pick(CITIES), "the cinema", "the park"]), d.chance(0.5)
    color = d.pick(COLORS)
    t = Turns()
    t.p1(d.pick(["Lost and found office. Can I help you?", "Hello, how can I help you?"]))
    t.p2(d.pick([f"I think I left my {thing} on {place} yesterday.", f"I lost my {thing}. It must have been on {place}."]))
    t.p1(d.pick(["What does it look like?", "Can you describe it?"]))
    t.p2(d.pick([f"It's {color}, and it has {contents} in it." if thing != "umbrella" else f"It's a {color} umbrella. Not expensive, but it was a gift.",
                 f"A {color} {thing}."]))
    if found:
        t.p1(d.pick([f"Let me check... Is this it?", f"We had a {color} {thing} handed in this morning. Is this yours?"]))
        t.p2(d.pick(["Yes! Thank you so much.", "That's it! I'm so relieved."]))
        outcome = f"#Person1# finds it and returns it to #Person2#"
    else:
        t.p1(d.pick(["Nothing like that has been handed in. Please fill in this form and we'll call you.", "I'm sorry, it's not here. Leave your number and we'll contact you."]))
        t.p2("All right, thank you.")
        outcome = "it hasn't been handed in, so #Person2# leaves contact details"
    summary = d.summarize([f"#Person2# lost a {color} {thing} on {place}; {outcome}.",
                           f"#Person2# asks #Person1# about a {color} {thing} left on {place}, and {outcome}."],
                           f"#Person2# reports a lost {color} {thing} from {place}, and {outcome}.")
    return t, summary


@scenario("taxi ride")
def taxi_ride(d: Draw):
    dest = d.pick(["the airport", "the central station", "the City Hospital", "the Hilton Hotel", "the convention center"])
    minutes, fare = d.num(15, 50, 5), d.num(18, 60)
    traffic = d.chance(0.5)
    t = Turns()
    t.p1(d.pick(["Where to?", "Good morning. Where would you like to go?"]))
    t.p2(d.pick([f"To {dest}, please. How long will it take?", f"{dest.capitalize()}, please. I'm in a bit of a hurry."]))
    if traffic:
        t.p1(d.pick(["The main road is blocked by an accident. I'll take the ring road.", "There's heavy traffic downtown, so I'll go around it."]))
        t.p2("Whatever is faster.")
    t.p1(d.pick([f"About {number_words(minutes)} minutes.", f"Maybe {number_words(minutes)} minutes, if we're lucky."]))
    t.p1(d.pick([f"Here we are. That's {d.say_money(fare)}.", f"We've arrived. The fare is {d.say_money(fare)}."]))
    tip = d.pick([0, 2, 5])
    t.p2(f"Here's {d.say_money(fare + tip)}. Keep the change." if tip else "Here you are. Can I have a receipt?")
    summary = d.summarize([f"#Person1# drives #Person2# to {dest}{', avoiding traffic on the way,' if traffic else ''} in about {number_words(minutes)} minutes; #Person2# pays {dollars(fare + tip)}{' including a tip' if tip else ' and asks for a receipt'}.",
                           f"#Person2# takes #Person1#'s taxi to {dest}. The ride costs {dollars(fare)}{' and #Person2# tips ' + dollars(tip) if tip else ''}."],
                           f"#Person2# rides to {dest} in about {number_words(minutes)} minutes and pays {dollars(fare + tip)}{', tip included' if tip else ''}.")
    return t, summary


@scenario("library")
def library(d: Draw):
    books, limit, weeks = d.num(2, 7), d.pick([3, 5]), d.num(2, 4)
    fee = d.pick([10, 25, 50])
    t = Turns()
    t.p2(d.pick(["Hi, I'd like to borrow these books.", "Excuse me, can I check these out?"]))
    t.p1(d.pick(["Sure. May I have your library card?", "Of course. Your card, please."]))
    t.p2(d.pick([f"Here it is. I have {number_words(books)} books.", f"Here. There are {number_words(books)} of them."]))
    taken = min(books, limit)
    if books > limit:
        t.p1(d.pick([f"I'm sorry, you can only borrow {number_words(limit)} at a time.", f"Students can take out at most {number_words(limit)} books."]))
        t.p2(d.pick([f"Oh, then I'll take the first {number_words(limit)} and come back for the rest.", "OK, I'll leave the others for now."]))
    t.p1(d.pick([f"They're due back in {number_words(weeks)} weeks.", f"You can keep them for {number_words(weeks)} weeks."]))
    t.p2(d.pick(["What if I'm late?", "And if I return them late?"]))
    t.p1(d.pick([f"It's {number_words(fee)} cents a day for each book.", f"There's a fine of {number_words(fee)} cents per book per day."]))
    summary = d.summarize([f"#Person2# borrows {number_words(taken)} books{', the library limit,' if books > limit else ''} for {number_words(weeks)} weeks; late returns cost {fee} cents a day per book.",
                           f"#Person1# lends #Person2# {number_words(taken)} of the {number_words(books)} books #Person2# wanted; they are due in {number_words(weeks)} weeks."
                           if books > limit else f"#Person1# checks out {number_words(books)} books for #Person2#, due in {number_words(weeks)} weeks, with a {fee}-cent daily fine per book if late."],
                           f"#Person2# checks out {number_words(taken)} books for {number_words(weeks)} weeks{' because of the library limit' if books > limit else ''}; the late fee is {fee} cents a day per book.")
    return t, summary
