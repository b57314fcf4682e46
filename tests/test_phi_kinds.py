"""Every Safe Harbor kind the scanner covers, found at its exact span in sentences written here
(no value comes from the demo generator or from the scanner's own lists on purpose)."""

import pytest

from fedgen.audits.phi import build_analyzer, scan


@pytest.fixture(scope="module")
def analyzer():
    return build_analyzer()


def found(analyzer, text):
    return [(f.entity_type, text[f.start : f.end]) for f in scan(analyzer, [text])]


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("Seen today with her son Chidubem Okonkwo, who drove her in.", "Chidubem Okonkwo"),  # Igbo
        ("Dr. Siddharth Raghunathan reviewed the ECG.", "Dr. Siddharth Raghunathan"),  # Tamil
        ("Interpreter requested for Nguyễn Thị Hương at the next visit.", "Nguyễn Thị Hương"),  # Vietnamese
        ("Patient Wojciech Brzęczyszczykiewicz reports better sleep.", "Wojciech Brzęczyszczykiewicz"),  # Polish
        ("Her daughter Aroha Ngata will collect the prescription.", "Aroha Ngata"),  # Māori
        ("Discussed the plan with Mr. Kwabena Asante by phone.", "Mr. Kwabena Asante"),  # Akan
        ("Spoke with his wife, Ayşegül Yılmazoğlu, about the dose.", "Ayşegül Yılmazoğlu"),  # Turkish
        ("Referred by Dr. Xiaoming Zhou of the memory service.", "Dr. Xiaoming Zhou"),  # Chinese
        ("Next of kin: Oluwaseun Adeyemi (brother).", "Oluwaseun Adeyemi"),  # Yoruba
        ("Emergency contact: Saoirse Ní Bhriain, sister.", "Saoirse Ní Bhriain"),  # Irish
        ("Ms. Björk Guðmundsdóttir attended alone.", "Ms. Björk Guðmundsdóttir"),  # Icelandic
        ("Her husband Tupac Quispe Mamani stayed overnight.", "Tupac Quispe Mamani"),  # Quechua
    ],
)
def test_names_of_many_origins(analyzer, text, name):
    assert found(analyzer, text) == [("PERSON", name)]


def test_a_first_name_alone_after_a_cue_or_before_a_clinical_verb(analyzer):
    assert found(analyzer, "Teodora presented with palpitations.") == [("PERSON", "Teodora")]
    assert found(analyzer, "Her grandson Ikaika drove her to clinic.") == [("PERSON", "Ikaika")]


@pytest.mark.parametrize(
    "date",
    [
        "March 14, 2024", "14 March 2024", "14th of March", "Mar 14", "Tuesday, March 14th",
        "14-Mar-2024", "03/14/2024", "14.03.2024", "2024-03-14", "14/3/2024",
    ],
)  # fmt: skip
def test_dates_in_many_formats(analyzer, date):
    assert found(analyzer, f"Admitted on {date} after a fall at home.") == [("DATE_TIME", date)]


def test_a_bare_year_is_not_a_date(analyzer):
    assert found(analyzer, "Symptoms began in 2019 and worsened over the winter.") == []


@pytest.mark.parametrize(
    ("text", "phone"),
    [
        ("Call her daughter on +44 20 7946 0958 after six.", "+44 20 7946 0958"),
        ("Mobile: +49 151 23456789.", "+49 151 23456789"),
        ("Fax results to +33 1 45 67 89 10 today.", "+33 1 45 67 89 10"),
        ("Tel. 0049 30 1234567 (home).", "0049 30 1234567"),
        ("Callback number +81-3-5555-0199.", "+81-3-5555-0199"),
        ("Phone (415) 555-2671 for the pharmacy.", "(415) 555-2671"),
        ("Reach him on 020 7946 0321.", "020 7946 0321"),
        ("Spoke with the ward at (2741)-6630 about it.", "(2741)-6630"),
        ("Pharmacy is on 0651-4419273 until noon.", "0651-4419273"),
        ("Spoke with his GP at 612 407 983 about the dose.", "612 407 983"),
        ("Reached the son at 527 61 804 on the second try.", "527 61 804"),
        ("Left a message at 358-4-2218-7730 for the family.", "358-4-2218-7730"),
        ("Please call 06-12345678 tomorrow.", "06-12345678"),
        ("Please stop sending messages to 55 123 45 67 now.", "55 123 45 67"),
        ("Spoke with the nurse at 8123.4567 today.", "8123.4567"),
        ("Call the office on 612 3344 if needed.", "612 3344"),  # "call" is one of spaCy's stop words
        ("Her numbers are 21 345 678-Office and", "21 345 678"),
    ],
)
def test_international_and_national_phones(analyzer, text, phone):
    assert found(analyzer, text) == [("PHONE_NUMBER", phone)]


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("She lives at Lindenstraße 42, 10969 Berlin, with her sister.",
         [("STREET_ADDRESS", "Lindenstraße 42"), ("POSTAL_CODE", "10969"), ("LOCATION", "Berlin")]),
        ("Home address: 17 rue des Lilas, 69003 Lyon.",
         [("STREET_ADDRESS", "17 rue des Lilas"), ("POSTAL_CODE", "69003"), ("LOCATION", "Lyon")]),
        ("Moved to Via Garibaldi 8, 40124 Bologna last spring.",
         [("STREET_ADDRESS", "Via Garibaldi 8"), ("POSTAL_CODE", "40124"), ("LOCATION", "Bologna")]),
        ("Address: Calle de Alcalá 120, 28009 Madrid.",
         [("STREET_ADDRESS", "Calle de Alcalá 120"), ("POSTAL_CODE", "28009"), ("LOCATION", "Madrid")]),
        ("Letters go to 221B Baker Street, London NW1 6XE.",
         [("STREET_ADDRESS", "221B Baker Street"), ("LOCATION", "London"), ("POSTAL_CODE", "NW1 6XE")]),
        ("Lives at Kungsgatan 12, 111 43 Stockholm.",
         [("STREET_ADDRESS", "Kungsgatan 12"), ("POSTAL_CODE", "111 43"), ("LOCATION", "Stockholm")]),
        ("Address: ul. Marszałkowska 84, 00-514 Warszawa.",
         [("STREET_ADDRESS", "ul. Marszałkowska 84"), ("POSTAL_CODE", "00-514"), ("LOCATION", "Warszawa")]),
        ("Resides at 350 Bloor Street West, Toronto, ON M5S 1W9.",
         [("STREET_ADDRESS", "350 Bloor Street West"), ("LOCATION", "Toronto"), ("POSTAL_CODE", "M5S 1W9")]),
        ("Post goes to Vesterbrogade 12, Aarhus C 8000 now.",
         [("STREET_ADDRESS", "Vesterbrogade 12"), ("LOCATION", "Aarhus C"), ("POSTAL_CODE", "8000")]),
        ("Ship to:\n14 Lipowa Street\nLublin\nPoland 20-020",
         [("STREET_ADDRESS", "14 Lipowa Street"), ("LOCATION", "Lublin"), ("POSTAL_CODE", "20-020")]),
        ("Return address: Husova 8, Brno, Czech Republic 602 00.",
         [("STREET_ADDRESS", "Husova 8"), ("LOCATION", "Brno"), ("POSTAL_CODE", "602 00")]),
    ],
)  # fmt: skip
def test_addresses_of_many_countries(analyzer, text, pieces):
    assert found(analyzer, text) == pieces


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        # A street with no type word, then a code and its town.
        ("The forms go to Vinohradská 1825/12, 120 00 Praha by post.",
         [("STREET_ADDRESS", "Vinohradská 1825/12"), ("POSTAL_CODE", "120 00"), ("LOCATION", "Praha")]),
        ("Her flat is at Wiejska 4/6, 00-902 Warszawa.",
         [("STREET_ADDRESS", "Wiejska 4/6"), ("POSTAL_CODE", "00-902"), ("LOCATION", "Warszawa")]),
        ("My address is Fjellgata 12, TROMSØ 9008 now.",
         [("STREET_ADDRESS", "Fjellgata 12"), ("LOCATION", "TROMSØ"), ("POSTAL_CODE", "9008")]),
        # Lower-case words beside a type that is no English word; labelled house numbers and units.
        ("Case manager will post the letter to Petőfi Sándor utca 14, 1052 Budapest next week.",
         [("STREET_ADDRESS", "Petőfi Sándor utca 14"), ("POSTAL_CODE", "1052"), ("LOCATION", "Budapest")]),
        ("Forward to Trg bana Jelačića 3, 10000 Zagreb.",
         [("STREET_ADDRESS", "Trg bana Jelačića 3"), ("POSTAL_CODE", "10000"), ("LOCATION", "Zagreb")]),
        ("Forward the records to Atatürk Caddesi No: 45, 06420 Ankara today.",
         [("STREET_ADDRESS", "Atatürk Caddesi No: 45"), ("POSTAL_CODE", "06420"), ("LOCATION", "Ankara")]),
        ("She will mail it to ul. Lenina, d. 15, kv. 3, Moskva, 125009 soon.",
         [("STREET_ADDRESS", "ul. Lenina, d. 15, kv. 3"), ("LOCATION", "Moskva"), ("POSTAL_CODE", "125009")]),
        ("Home address updated to Mannerheimintie 18 A 5, 00100 Helsinki.",
         [("STREET_ADDRESS", "Mannerheimintie 18 A 5"), ("POSTAL_CODE", "00100"), ("LOCATION", "Helsinki")]),
        ("The letter went to Am Markt 3, 28195 Bremen yesterday.",
         [("STREET_ADDRESS", "Am Markt 3"), ("POSTAL_CODE", "28195"), ("LOCATION", "Bremen")]),
        ("Return it to Via dei Mille 5, 80121 Napoli today.",
         [("STREET_ADDRESS", "Via dei Mille 5"), ("POSTAL_CODE", "80121"), ("LOCATION", "Napoli")]),
        # Address labels: a unit after the street, a region's line, a code on a line of its own.
        ("Billing address: Maren Olsen\n    14 Kirkeveien Apt. 12\n   Lillehammer\n    \n    2609\n",
         [("PERSON", "Maren Olsen"), ("STREET_ADDRESS", "14 Kirkeveien Apt. 12"), ("LOCATION", "Lillehammer"),
          ("POSTAL_CODE", "2609")]),
        ("Billing address: Joe Pratt\n    88 Baker Lane Suite 4\n   Pinedale\n    WY\n    82941\n",
         [("PERSON", "Joe Pratt"), ("STREET_ADDRESS", "88 Baker Lane Suite 4"), ("LOCATION", "Pinedale"),
          ("POSTAL_CODE", "82941")]),
        ("Ship to:\n  22 Lakeshore Drive\n  Unit 7\n  SPRING VALLEY\n  Canada K0A 1B0",
         [("STREET_ADDRESS", "22 Lakeshore Drive"), ("STREET_ADDRESS", "Unit 7"), ("LOCATION", "SPRING VALLEY"),
          ("POSTAL_CODE", "K0A 1B0")]),
        ("Ms. Ana Silva Unit 3 17 R Direita\nBraga BR 4700-321",
         [("PERSON", "Ms. Ana Silva"), ("STREET_ADDRESS", "Unit 3"), ("STREET_ADDRESS", "17 R Direita"),
          ("LOCATION", "Braga BR"), ("POSTAL_CODE", "4700-321")]),
        ("Please mail the forms to Ilica 242, 10000 Zagreb. Call 06-12345678 first.",  # a town ends at a full stop
         [("STREET_ADDRESS", "Ilica 242"), ("POSTAL_CODE", "10000"), ("LOCATION", "Zagreb"),
          ("PHONE_NUMBER", "06-12345678")]),
        ("Please return to Osvobození 1019, Ostrava 3 703 00 in case of an issue.",
         [("STREET_ADDRESS", "Osvobození 1019"), ("LOCATION", "Ostrava 3"), ("POSTAL_CODE", "703 00")]),
        ("Ship to: 12 Rivers Road\n Unit 3\n Limassol\n Cyprus (Greek) 3035",
         [("STREET_ADDRESS", "12 Rivers Road"), ("STREET_ADDRESS", "Unit 3"), ("LOCATION", "Limassol"),
          ("POSTAL_CODE", "3035")]),
        ("Mail goes to 19 C/ Mayor\n Apt. 2\n Villanueva de la Serena\n Spain 06700",
         [("STREET_ADDRESS", "19 C/ Mayor"), ("STREET_ADDRESS", "Apt. 2"), ("LOCATION", "Villanueva de la Serena"),
          ("POSTAL_CODE", "06700")]),
    ],
)  # fmt: skip
def test_addresses_without_an_english_street_type(analyzer, text, pieces):
    assert found(analyzer, text) == pieces


@pytest.mark.parametrize(
    ("text", "street"),
    [
        ("Hello, my new address is Louny 667 from now on.", "Louny 667"),
        ("Previous address on file was Kościuszki 12.", "Kościuszki 12"),
        ("Her address has changed to Lipová 8.", "Lipová 8"),
        ("She lives at 1097 Melshorn with her son.", "1097 Melshorn"),
    ],
)
def test_a_street_after_an_address_cue_and_its_verb(analyzer, text, street):
    assert found(analyzer, text) == [("STREET_ADDRESS", street)]


def test_a_state_named_city_is_a_place(analyzer):
    assert found(analyzer, "She moved from New York to San Francisco in May.") == [
        ("LOCATION", "New York"), ("LOCATION", "San Francisco"),
    ]  # fmt: skip
    assert found(analyzer, "I am moving to 3 Elm Road, New York 10011.") == [
        ("STREET_ADDRESS", "3 Elm Road"), ("LOCATION", "New York"), ("POSTAL_CODE", "10011"),
    ]  # fmt: skip


def test_a_city_after_a_place_cue(analyzer):
    assert found(analyzer, "She grew up in Tromsø and moved here in 2010.") == [("LOCATION", "Tromsø")]
    # A listed city that is also a rare English word, but not an everyday one.
    assert found(analyzer, "Her brother drove over from Roanoke last week.") == [("LOCATION", "Roanoke")]
    assert found(analyzer, "She was seen at Home in March, back to Work in Time for lunch.") == []


@pytest.mark.parametrize(
    ("text", "place"),
    [
        ("Her sister lives in Bruck an der Mur and visits monthly.", "Bruck an der Mur"),
        ("Where: Montreal Country Club.", "Montreal"),
        ("My friend lives in Litomyšl", "Litomyšl"),  # the NER calls it a language
        ("She flew to Pickle Lake on Sunday morning.", "Pickle Lake"),
        ("She flew to CABBAGE TREE CREEK on Sunday morning.", "CABBAGE TREE CREEK"),
    ],
)
def test_places_joined_by_small_words_or_before_english_words(analyzer, text, place):
    assert found(analyzer, text) == [("LOCATION", place)]


def test_particles_do_not_join_a_weekday(analyzer):
    assert ("PERSON", "Mansilla de la Sierra") in found(analyzer, "He returned from Mansilla de la Sierra on Friday.")


@pytest.mark.parametrize(
    "text",
    [
        "I am French but I live in Spain.",
        "There's a nice new Danish place downtown.",
        "Started Sertraline last week; Lisinopril continued.",
        "Patient takes Metformin and Atorvastatin.",
    ],
)
def test_nationalities_and_drugs_are_not_names(analyzer, text):
    assert found(analyzer, text) == []


def test_a_capitalised_function_word_before_a_clinical_verb_is_not_a_name(analyzer):
    assert found(analyzer, "Reports feeling low. Has declined social invitations.") == []
    assert found(analyzer, "Low mood. Teodora declined social invitations.") == [("PERSON", "Teodora")]


def test_a_name_answering_a_question(analyzer):
    assert found(analyzer, "What's your last name? Okonjo") == [("PERSON", "Okonjo")]


def test_a_rare_first_name_the_ner_calls_a_nationality_after_a_person_cue(analyzer):
    assert found(analyzer, "Her son Christian will drive her home.") == [("PERSON", "Christian")]


@pytest.mark.parametrize(
    ("text", "street"),
    [
        ("The new clinic is on Avenida Tancredo Neves. Parking is free.", "Avenida Tancredo Neves"),
        ("He lives on the east side of ul. Tadeusza Kościuszki now.", "ul. Tadeusza Kościuszki"),
        ("Deliveries go to Pelham Road on weekdays.", "Pelham Road"),
        ("Her flat faces rue de la Roquette, near the market.", "rue de la Roquette"),
        ("The bus stop is on Lindenstraße near the bakery.", "Lindenstraße"),
        ("He lives on the north side of Gosposka ulica now.", "Gosposka ulica"),
    ],
)
def test_a_street_named_without_its_number(analyzer, text, street):
    assert ("STREET_ADDRESS", street) in found(analyzer, text)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("Member number on the card; subscriber Tarjei Fossheim. No acute distress.", "Tarjei Fossheim"),
        ("She lives with her niece Marisol Head, who manages her tablets.", "Marisol Head"),
        ("Ilkka presented with dizziness this morning.", "Ilkka"),
        ("Dorotea is very reliable with the tablets.", "Dorotea"),
        ("Okonjo was very reliable with the tablets.", "Okonjo"),  # in no name list
    ],
)
def test_names_after_a_role_or_before_a_verb(analyzer, text, name):
    assert ("PERSON", name) in found(analyzer, text)


@pytest.mark.parametrize(
    ("text", "age"),
    [
        ("A 92-year-old woman with a hip fracture.", "92"),
        ("Mr. Dlamini, aged 97, lives with family.", "97"),
        ("103 y/o male, alert and oriented.", "103"),
        ("Age: 91. Allergies: none.", "91"),
        ("She is 95 years old and walks with a frame.", "95"),
        ("Mrs. Okafor, 98, was seen at home.", "98"),
        ("Resident of Tromsø, 101, lives alone.", "101"),
    ],
)
def test_ages_over_89(analyzer, text, age):
    assert ("AGE", age) in found(analyzer, text)


def test_ages_up_to_89_are_not_phi(analyzer):
    assert found(analyzer, "A 67-year-old man, aged 67, with COPD.") == []


@pytest.mark.parametrize(
    ("text", "entity_type", "value"),
    [
        ("MRN: 00482917 on admission.", "MEDICAL_RECORD_NUMBER", "00482917"),
        ("Hospital number RX-2291-774 on the wristband.", "MEDICAL_RECORD_NUMBER", "RX-2291-774"),
        ("Member ID XQH834920137 for the claim.", "HEALTH_PLAN_NUMBER", "XQH834920137"),
        ("Medicare number 1EG4-TE5-MK73 verified.", "HEALTH_PLAN_NUMBER", "1EG4-TE5-MK73"),
        ("Health plan #: QXH-829-10-4417 on the card.", "HEALTH_PLAN_NUMBER", "QXH-829-10-4417"),
        ("Policy # 55-2910-883 lapsed.", "HEALTH_PLAN_NUMBER", "55-2910-883"),
        ("Billing account 0048213-77 is overdue.", "ACCOUNT_NUMBER", "0048213-77"),
        ("Card 4111 1111 1111 1111 declined.", "ACCOUNT_NUMBER", "4111 1111 1111 1111"),
        ("IBAN DE89 3704 0044 0532 0130 00 for refunds.", "ACCOUNT_NUMBER", "DE89 3704 0044 0532 0130 00"),
        ("Driver's licence D1234-56789-01234 copied.", "LICENSE_NUMBER", "D1234-56789-01234"),
        ("DEA number BK7284913 on the prescription.", "LICENSE_NUMBER", "BK7284913"),
        ("VIN 1HGCM82633A004352 recorded by the police.", "VEHICLE_ID", "1HGCM82633A004352"),
        ("Licence plate KT-482-XZ seen leaving.", "VEHICLE_ID", "KT-482-XZ"),
        ("Pacemaker serial number PJN829103S checked.", "DEVICE_ID", "PJN829103S"),
        ("UDI (01)00884838012345(17)251231(10)A213B1 logged.", "DEVICE_ID", "(01)00884838012345(17)251231(10)A213B1"),
        ("SSN 536-22-1234 on file.", "US_SSN", "536-22-1234"),
        ("Social security number 536 22 1234 confirmed.", "US_SSN", "536 22 1234"),
        ("Portal https://portal.example.org/patients/123, then home.", "URL", "https://portal.example.org/patients/123"),
        ("Logged in from 10.20.30.40 at night.", "IP_ADDRESS", "10.20.30.40"),
        ("Write to k.mensah@clinic.co.uk for copies.", "EMAIL_ADDRESS", "k.mensah@clinic.co.uk"),
        # A labelled identifier outranks the phone shape it also has; an IBAN of seven groups.
        ("Licence number 272 260 819 on the form.", "LICENSE_NUMBER", "272 260 819"),
        ("Billing account IT95 4164 8179 3588 6258 6091 04; paid.", "ACCOUNT_NUMBER", "IT95 4164 8179 3588 6258 6091 04"),
        ("Is there a fee for a money transfer from 5521-883120-07 today?", "ACCOUNT_NUMBER", "5521-883120-07"),
    ],
)  # fmt: skip
def test_each_identifier_kind(analyzer, text, entity_type, value):
    assert found(analyzer, text) == [(entity_type, value)]
