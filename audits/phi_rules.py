"""fedgen's own PHI recognizers, beside Presidio's: the rules that carry recall on text nobody
tuned them for.

- ``NameAndPlaceRecognizer``: the statistical NER's PERSON and place entities, plus Philter-style
  token rules over the spaCy doc: a run of capitalised tokens that are known names (Faker's lists
  of every locale) or not known English words is a PERSON after a person cue ("Dr.", "patient",
  "daughter", "seen by") or when it holds a known name; after a place cue ("lives in", "from")
  or when it is a known city, a LOCATION. Countries and US states are not PHI and are skipped.
- ``CueIdentifierRecognizer``: an identifier-shaped run (letters and digits, at least two
  digits) after a label names its kind: medical record, health plan, account, licence,
  vehicle, device, SSN.
- pattern recognizers: dates in numeric, ISO, written and partial forms (never a bare year),
  ages over 89, national and international phone and fax numbers, street addresses of many
  countries (number first or last, fused suffixes such as "-straße" and "-vägen"), P.O. boxes,
  distinctive postal codes, VIN, IMEI and UDI shapes.
- ``attach_places``: after the scan, a number or postal-code shape and capitalised words
  directly beside an address or a city are a postal code and a city.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import regex
from presidio_analyzer import EntityRecognizer, Pattern, PatternRecognizer, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts

from fedgen.audits.phi_lexicon import Lexicon, fold

__all__ = [
    "NameAndPlaceRecognizer",
    "CueIdentifierRecognizer",
    "pattern_recognizers",
    "attach_places",
    "NER_PLACE_LABELS",
]

CASE_SENSITIVE = regex.DOTALL | regex.MULTILINE  # Presidio's default adds IGNORECASE
NER_SCORE = 0.85
GAZETTEER_SCORE = 0.85
CUE_SCORE = 0.7
# An identifier after the label that names its kind outranks a shape guess with a context word
# (0.4 + 0.35): "Licence number 272 260 819" is a licence, not a phone.
LABELLED_ID_SCORE = 0.8
UNKNOWN_PAIR_SCORE = 0.5
NER_PLACE_LABELS = ("GPE", "LOC", "FAC")
LINE = regex.compile(r"[^\n]+")
LINE_END = regex.compile(r"[ \t]*(?:\n|\Z)")

# --- names and places over the spaCy doc ------------------------------------------------------

TITLES = {"mr", "mrs", "ms", "miss", "mx", "dr", "prof", "sr", "sra", "srta", "mme", "mlle", "herr", "frau",
          "sir", "dame", "lady", "lord", "rev", "fr", "sister", "nurse", "doctor", "dott", "dra"}  # fmt: skip
PERSON_CUES = TITLES | {
    "patient", "pt", "pts", "mother", "father", "mom", "mum", "dad", "son", "daughter", "wife", "husband",
    "partner", "spouse", "sister", "brother", "sibling", "aunt", "uncle", "niece", "nephew", "cousin",
    "grandson", "granddaughter", "grandmother", "grandfather", "grandma", "grandpa", "friend", "neighbour",
    "neighbor", "caregiver", "carer", "guardian", "kin", "nok", "named", "name", "called", "physician",
    "attending", "therapist", "counsellor", "counselor", "worker", "manager", "by", "per", "with", "attn",
    "cc", "signed", "dear", "contact", "subscriber", "beneficiary", "client", "resident", "surgeon",
    "colleague", "fiancé", "fiance", "fiancée", "girlfriend", "boyfriend", "child", "kid", "baby", "am",
    "i'm", "im", "ask", "for", "tell", "meet", "and", "to", "from", "hi", "hello", "thanks", "thank",
}  # fmt: skip
# Person cues that are also everyday function words: a run after one of them needs a known name
# or a token that is not an English word; after any other person cue (a title, a relation, a
# role) one token that is not an English word is enough ("subscriber Arner Haukland").
FUNCTION_PERSON_CUES = {"by", "per", "with", "for", "and", "to", "from", "am", "i'm", "im", "ask", "tell", "meet",
                        "hi", "hello", "thanks", "thank"}  # fmt: skip
# Cue words that also precede plain capitalised words often: they qualify only known names or
# tokens that are not English words (as every cue does), never an English word alone.
PLACE_CUES = {"in", "from", "to", "near", "at", "of", "visiting", "towards", "outside", "around", "where"}
PARTICLES = {"van", "von", "de", "der", "den", "da", "di", "del", "della", "dos", "das", "du", "des", "la",
             "le", "bin", "ibn", "al", "el", "ter", "ten", "te", "op", "het", "zu", "af", "av", "st", "st."}  # fmt: skip
# Joining words of place names that are also everyday words ("Frankfurt am Main", "Vilanova i la
# Geltrú", "Nes aan de Amstel"): they join only a word that is not English ("... on March" stays apart).
WEAK_PARTICLES = {"i", "í", "á", "aan", "nad", "pod", "am", "an", "im", "en", "sur", "sous", "upon", "on",
                  "les", "do", "bei", "ob", "unter", "ad", "na", "y"}  # fmt: skip
# Verbs whose subject is a person: "Yulian presented", "Ayna reports".
PERSON_CUES_AFTER = {
    "presented", "presents", "reports", "reported", "denies", "denied", "states", "stated", "says", "said",
    "complains", "complained", "agrees", "agreed", "attended", "arrived", "called", "returned", "feels",
    "felt", "lives", "lived", "works", "worked", "died", "visited", "declined", "refused", "consented",
    "walked", "smokes", "drinks", "admits", "admitted", "endorses", "endorsed", "wants", "wishes", "asked",
}  # fmt: skip
# Verbs whose subject is a known name more often than anything else: "Ava is very reliable".
NAME_CUES_AFTER = {"is", "was", "has", "had", "will", "would", "can", "explained", "told", "wrote", "added", "noted",
                   "recalled", "confirmed", "mentioned", "replied", "emailed", "phoned", "texted", "gave"}  # fmt: skip
# The unions and differences the rules test tokens against, made once (not at every token).
CUES = PERSON_CUES | PLACE_CUES
STRONG_PERSON_CUES = PERSON_CUES - FUNCTION_PERSON_CUES
PERSON_CUES_BUT_I_AM = PERSON_CUES - {"am", "i'm", "im"}
CUES_AFTER = PERSON_CUES_AFTER | NAME_CUES_AFTER
JOINING_WORDS = PARTICLES | WEAK_PARTICLES
MAX_RUN = 5
MIN_CITY_CHARS = 3  # "Tel", "Ely": a city this short is a place only after a place cue
# A proper noun right before one of these names a test, scale or disease, not a person or place:
# "Columbia scale", "Glasgow Coma Scale", "Beck Depression Inventory", "Parkinson's disease".
EPONYM_NEXT = {"scale", "score", "criteria", "test", "questionnaire", "inventory", "index", "syndrome",
               "disease", "sign", "classification", "protocol", "method", "rating", "coma", "depression",
               "anxiety", "screen", "screening", "assessment", "procedure", "manoeuvre", "maneuver", "tube"}  # fmt: skip


# Endings of drug names (INN stems): a capitalised word ending so that is no known name is a drug,
# not a person or place ("Sertraline", "Lisinopril", "Atorvastatin", "Metformin").
DRUG_ENDINGS = ("pril", "sartan", "olol", "statin", "prazole", "azole", "oxacin", "cycline", "cillin", "mycin",
                "mab", "tinib", "parin", "gliptin", "gliflozin", "tidine", "dipine", "triptan", "setron", "lukast",
                "azepam", "zolam", "formin", "glitazone", "thiazide", "semide", "oxetine", "traline", "apine",
                "idone", "afil", "dronate", "terol", "olone", "caine", "zosin", "pramine", "triptyline", "profen",
                "fenac", "coxib", "floxacin", "vudine", "navir", "ciclovir", "conazole", "dazole", "xaban",
                "gatran", "grel", "lukast", "tropium", "sonide", "metasone", "nisolone", "cortisone")  # fmt: skip
# NER labels of words that name no one: nationalities and groups ("I am French"), languages.
NER_NOT_PHI_LABELS = ("NORP", "LANGUAGE")
# How nationality and language words end ("French", "Danish", "Japanese", "Brazilian", "Greek",
# "Thai", "Swiss"): the NER also calls an unknown town a language ("lives in Litomyšl").
DEMONYM_ENDINGS = ("ish", "ese", "an", "ic", "ch", "er", "i", "ss", "sh", "ek", "ak", "ot", "ar")
# Words that end a place's name after a place cue, all English words or not ("Pickle Lake").
GEO_FEATURES = {"lake", "lakes", "creek", "river", "falls", "springs", "spring", "pass", "valley", "hills", "hill",
                "heights", "beach", "bay", "harbour", "harbor", "point", "island", "islands", "park", "station",
                "city", "town", "village", "mills", "junction", "crossing", "bridge", "flat", "flats", "ridge",
                "grove", "mountain", "mount", "plains", "forest", "woods", "meadows", "cove", "landing", "ferry"}  # fmt: skip


@functools.lru_cache(maxsize=1 << 16)  # asked of every token, often more than once
def _is_capitalised(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    if not letters or not text[0].isupper():
        return False
    if all(c.isupper() for c in letters):
        return len(letters) >= 4  # "BINSTED" yes; "CHF", "INR", "ED" are abbreviations
    return True


def _name_like(token) -> bool:
    return _name_shaped(token.text)


@functools.lru_cache(maxsize=1 << 16)
def _name_shaped(text: str) -> bool:
    return _is_capitalised(text) and all(c.isalpha() or c in "'’.-" for c in text) and not text.endswith("'s")


class _Token(NamedTuple):
    """What the token rules read of a spaCy token, read once: ``doc[i]`` builds a new Token and
    each attribute is looked up again, which took a fifth of the rules' time."""

    text: str
    lower_: str
    whitespace_: str
    is_alpha: bool
    idx: int


def _span_text(tokens: list[_Token], start: int, end: int) -> str:
    """``doc[start:end].text``: the tokens and the spaces between them."""
    return "".join(t.text + t.whitespace_ for t in tokens[start : end - 1]) + tokens[end - 1].text


class NameAndPlaceRecognizer(EntityRecognizer):
    """PERSON and LOCATION from the NER and from token rules over known names, cities and words."""

    def __init__(self, lexicon: Lexicon, *, use_ner: bool = True) -> None:
        self.lexicon = lexicon
        self.use_ner = use_ner
        super().__init__(
            supported_entities=["PERSON", "LOCATION"], name="NameAndPlaceRecognizer", supported_language="en"
        )

    def load(self) -> None:
        pass

    # A run: consecutive name-like tokens joined by spaces, hyphens or particles.
    def _runs(self, tokens) -> list[tuple[int, int]]:
        runs, i, n = [], 0, len(tokens)
        while i < n:
            lower = tokens[i].lower_.rstrip(".")
            after_title = (
                i > 0
                and tokens[i - 1].lower_.rstrip(".") in TITLES
                or i > 1
                and tokens[i - 1].text == "."
                and tokens[i - 2].lower_ in TITLES
            )
            particle_start = lower in PARTICLES and after_title and i + 1 < n and _name_like(tokens[i + 1])
            if not particle_start and (
                not _name_like(tokens[i]) or lower in TITLES or (lower in CUES and self.lexicon.is_word(lower))
            ):
                i += 1
                continue
            j = i + 1
            while j < n and j - i < MAX_RUN:
                token = tokens[j]
                previous = tokens[j - 1]
                if (
                    token.text in "-'’"
                    and not previous.whitespace_
                    and j + 1 < n
                    and not token.whitespace_
                    and tokens[j + 1].is_alpha
                ):
                    j += 2
                    continue
                # One to three joining words before the next name word ("Bruck an der Mur",
                # "Mansilla de la Sierra"): joined when one of them is a name particle or the
                # word after them is no English word.
                k = j
                while k < n and k - j < 3 and tokens[k].lower_ in JOINING_WORDS and tokens[k - 1].whitespace_:
                    k += 1
                if k > j and k < n and _name_like(tokens[k]):
                    joins = [tokens[m].lower_ for m in range(j, k)]
                    following = fold(tokens[k].text)
                    if any(w in PARTICLES for w in joins) or not (
                        self.lexicon.is_word(following) or following in self.lexicon.common_words
                    ):
                        j = k + 1
                        continue
                cue_word = token.lower_ in CUES and self.lexicon.is_word(token.lower_)
                if (
                    _name_like(token)
                    and previous.whitespace_ == " "
                    and fold(token.text).rstrip(".") not in TITLES
                    and not cue_word
                ):
                    j += 1
                    continue
                break
            runs.append((i, j))
            i = j
        return runs

    def _cue_before(self, tokens, start: int) -> str | None:
        """The folded word before the run, skipping "." after a title, ":" or "," after a label and
        "?" after a question ("What's your last name? Okonjo")."""
        k = start - 1
        while k >= 0 and tokens[k].text in {".", ":", ",", "(", "-", "—", "?"}:
            k -= 1
        return tokens[k].lower_.rstrip(".") if k >= 0 else None

    def _classify(self, tokens, start: int, end: int) -> tuple[str, float] | None:
        lex = self.lexicon
        words = [tokens[k] for k in range(start, end) if _name_like(tokens[k])]
        folded = [fold(t.text.strip(".")) for t in words]
        whole = fold(_span_text(tokens, start, end))
        if whole in lex.not_phi_places or all(f in lex.not_phi_places for f in folded) or self._drug(folded):
            return None
        names = [lex.is_name(f) for f in folded]
        known = [lex.is_word(f) for f in folded]
        unknown_or_name = all(n or not w for n, w in zip(names, known))
        cue = self._cue_before(tokens, start)
        cue_after = tokens[end].lower_ if end < len(tokens) else None
        if cue in PLACE_CUES and len(folded) >= 2 and folded[-1] in GEO_FEATURES:  # "flew to Pickle Lake"
            return "LOCATION", CUE_SCORE
        if all(t.text.isupper() for t in words):
            # Capitals only ("COPD", "IBAN", "BINSTED"): a known name or city after a cue, nothing else.
            known_proper = all(lex.is_name(f) or f in lex.city_words for f in folded)
            unknown_place = cue in PLACE_CUES and len(whole) > MIN_CITY_CHARS and not any(known)
            if unknown_place:
                return "LOCATION", CUE_SCORE
            if not (known_proper and cue in CUES):
                return None
        title_before = cue in TITLES
        first_is_name = folded[0] in lex.first_names or not known[0]
        city = whole in lex.cities
        if title_before:  # "Dr. Wynn", "Mrs. Baker": whatever is capitalised after a title
            return "PERSON", CUE_SCORE
        common = all(f in lex.common_words for f in folded)
        if cue in PLACE_CUES and (city or not any(names)) and (unknown_or_name or city and not (all(known) and common)):
            return "LOCATION", CUE_SCORE
        if cue in PLACE_CUES and any(names) and not all(known) and not city:  # "the transfer of Ava"
            return "PERSON", CUE_SCORE
        if cue in PERSON_CUES and (unknown_or_name or first_is_name and cue not in PLACE_CUES):
            return "PERSON", CUE_SCORE
        if cue in STRONG_PERSON_CUES and not all(known):
            return "PERSON", CUE_SCORE
        if cue_after in PERSON_CUES_AFTER and unknown_or_name and (not city or any(names)):  # "Florence reports"
            return "PERSON", CUE_SCORE
        if cue_after in NAME_CUES_AFTER and any(names) and unknown_or_name and not city:
            return "PERSON", GAZETTEER_SCORE
        if cue_after in NAME_CUES_AFTER and not any(known) and not city and len(folded) <= 2:  # "Okonjo is"
            return "PERSON", UNKNOWN_PAIR_SCORE
        if city and not all(known) and not any(names) and len(whole) > MIN_CITY_CHARS:
            return "LOCATION", GAZETTEER_SCORE
        if len(folded) >= 2 and any(names) and unknown_or_name:
            return "PERSON", GAZETTEER_SCORE
        if 2 <= len(folded) <= 3 and folded[0] in lex.first_names and not known[0] and not city:
            return "PERSON", GAZETTEER_SCORE
        calendar = folded[0] in lex.common_words  # "Sunday", "June": names too, but a cue decides
        if len(folded) == 1 and names[0] and not known[0] and not city and not calendar:  # "Florence", "Columbia"
            return "PERSON", GAZETTEER_SCORE
        if city and not all(known) and len(whole) > MIN_CITY_CHARS:
            return "LOCATION", GAZETTEER_SCORE
        if len(folded) >= 2 and not any(known) and start > 0:
            return "PERSON", UNKNOWN_PAIR_SCORE
        return None

    @staticmethod
    def _eponym(tokens, end: int) -> bool:
        """The span ending before token ``end`` names a scale, test or disease."""
        k = end
        if k < len(tokens) and tokens[k].text in {"'s", "’s", "-"}:
            k += 1
        return k < len(tokens) and tokens[k].lower_ in EPONYM_NEXT

    def _name_end(self, tokens, start: int, end: int) -> int:
        """``end`` without trailing English words that are not names ("Maria Lopez Patient")."""
        lex = self.lexicon
        if end - start == 2 and fold(tokens[start].text) in lex.first_names and _name_like(tokens[start + 1]):
            return end  # a first name and one more word: a surname that is also a word ("Isabel Head")
        while end - start > 1:
            token = tokens[end - 1]
            word = fold(token.text)
            if any(c.isalnum() for c in token.text) and (
                not token.is_alpha or not lex.is_word(word) or lex.is_name(word)
            ):
                break
            end -= 1  # punctuation or line breaks the NER took in, or an English word
        return end

    def _nationality(self, tokens, start: int, end: int, not_phi: set[int]) -> bool:
        """The NER calls the run a nationality or language ("I am French", "a Danish place") and
        no person cue says otherwise: the NER also calls rare first names so ("her son
        Christian", "Yulian presented", "with Vivian")."""
        if not all(k in not_phi for k in range(start, end)) or not fold(tokens[end - 1].text).endswith(DEMONYM_ENDINGS):
            return False
        after = tokens[end].lower_ if end < len(tokens) else None
        cue = self._cue_before(tokens, start)
        return cue not in PERSON_CUES_BUT_I_AM and after not in CUES_AFTER

    def _drug(self, folded: list[str]) -> bool:
        return any(f.endswith(DRUG_ENDINGS) and not self.lexicon.is_name(f) for f in folded)

    def _plausible_person(self, ent) -> bool:
        """The NER's PERSON, unless every word is an English word or a city and none is a name
        (sentence-initial "Sleeps", "Broken", "Columbia scale"), or a word is a drug's name."""
        folded = [fold(t.text) for t in ent if t.is_alpha]
        lex = self.lexicon
        if any(c.isdigit() for c in ent.text) or self._drug(folded):  # "KT-482-XZ" is an identifier
            return False
        return not folded or any(lex.is_name(f) or not (lex.is_word(f) or f in lex.cities) for f in folded)

    def _run_span(self, tokens, start: int, end: int) -> tuple[int, int]:
        """Character span of the run, with a title right before it ("Dr. Okafor")."""
        begin = tokens[start].idx
        k = start - 1
        if k >= 0 and tokens[k].text == ".":
            k -= 1
        if k >= 0 and tokens[k].lower_.rstrip(".") in TITLES and _is_capitalised(tokens[k].text):
            begin = tokens[k].idx
        last = tokens[end - 1]
        return begin, last.idx + len(last.text)

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts = None) -> list[RecognizerResult]:
        doc = nlp_artifacts.tokens
        tokens = [_Token(t.text, t.lower_, t.whitespace_, t.is_alpha, t.idx) for t in doc]
        results = []
        if self.use_ner:
            for ent in doc.ents:
                # Not "DL", "Tel", "COPD", "IBAN" (abbreviations the NER calls people or places),
                # nor "Columbia scale" (an eponym).
                if not _is_capitalised(ent.text) or len(ent.text) <= 3 or self._eponym(tokens, ent.end):
                    continue
                if len(ent) == 1 and ent.text.isupper() and not self.lexicon.is_name(fold(ent.text)):
                    continue
                if ent.label_ == "PERSON" and "PERSON" in entities and self._plausible_person(ent):
                    last = tokens[self._name_end(tokens, ent.start, ent.end) - 1]
                    results.append(RecognizerResult("PERSON", ent.start_char, last.idx + len(last.text), NER_SCORE))
                elif ent.label_ in NER_PLACE_LABELS and "LOCATION" in entities:
                    # One place per line: the NER runs an address label's lines together.
                    for line in LINE.finditer(ent.text):
                        name = line.group().strip().rstrip(" ,;:.")
                        begin = ent.start_char + line.start() + len(line.group()) - len(line.group().lstrip())
                        if name and fold(name.removeprefix("the ")) not in self.lexicon.not_phi_places:
                            # A "place" with a number in it is a street address ("Lindenstraße 42").
                            kind = "STREET_ADDRESS" if any(c.isdigit() for c in name) else "LOCATION"
                            results.append(RecognizerResult(kind, begin, begin + len(name), NER_SCORE))
        not_phi = {k for ent in doc.ents if ent.label_ in NER_NOT_PHI_LABELS for k in range(ent.start, ent.end)}
        for start, end in self._runs(tokens):
            if self._eponym(tokens, end) or self._nationality(tokens, start, end, not_phi):
                continue
            decided = self._classify(tokens, start, end)
            shorter = self._name_end(tokens, start, end) if decided is None else end
            if shorter < end and fold(_span_text(tokens, start, shorter)) in self.lexicon.cities:
                # A known city before English words: "Montreal" of "Where: Montreal Country Club".
                decided, end = self._classify(tokens, start, shorter), shorter
            if decided is None or decided[0] not in entities:
                continue
            if decided[0] == "PERSON":
                end = self._name_end(tokens, start, end)
            begin, finish = self._run_span(tokens, start, end)
            results.append(RecognizerResult(decided[0], begin, finish, decided[1]))
        return results


# --- identifiers after a label ----------------------------------------------------------------

ID_CUES = {
    "MEDICAL_RECORD_NUMBER": [
        r"mrn",
        r"mr\s?#",
        r"mr\s+no",
        r"medical\s+record(?:s)?",
        r"med\.?\s+rec\.?",
        r"records?",
        r"chart",
        r"patient\s+(?:id|number|no)",
        r"hospital\s+(?:number|no|id)",
        r"hosp\.?\s+no",
        r"unit\s+(?:number|no)",
        r"nhs\s+(?:number|no)",
        r"case\s+(?:number|no)",
        r"encounter",
        r"accession",
    ],
    "HEALTH_PLAN_NUMBER": [
        r"member(?:ship)?",
        r"subscriber",
        r"policy(?:holder)?",
        r"health\s+plan",
        r"plan",
        r"insurance",
        r"insurer",
        r"medicare",
        r"mbi",
        r"medicaid",
        r"beneficiary",
        r"group",
        r"payer",
        r"hicn?",
        r"ehic",
        r"coverage",
        r"insured",
    ],
    "ACCOUNT_NUMBER": [
        r"account",
        r"acct",
        r"a/c",
        r"iban",
        r"card",
        r"credit\s+card",
        r"debit\s+card",
        r"cc",
        r"bank\s+account",
        r"billing\s+account",
        r"routing",
        r"invoice",
        r"statement",
        r"(?:money\s+)?transfer(?:red|s)?\s+(?:from|to)",
    ],
    "LICENSE_NUMBER": [
        r"licen[cs]e",
        r"driver'?s\s+licen[cs]e",
        r"driving\s+licen[cs]e",
        r"driver\s+licen[cs]e",
        r"dl",
        r"dea",
        r"npi",
        r"certificate",
        r"permit",
        r"passport",
        r"registration\s+(?:number|no)",
    ],
    "VEHICLE_ID": [
        r"vin",
        r"vehicle\s+identification",
        r"vehicle(?:\s+id)?",
        r"licen[cs]e\s+plate",
        r"plates?",
        r"number\s+plate",
        r"registration\s+plate",
        r"car\s+registration",
        r"vehicle\s+registration",
        r"registration",
        r"reg\.?",
        r"tag",
    ],
    "DEVICE_ID": [
        r"serial",
        r"s/n",
        r"sn",
        r"device(?:\s+id)?",
        r"udi",
        r"imei",
        r"model",
        r"implant",
        r"lot",
        r"pacemaker",
        r"pump",
        r"defibrillator",
        r"icd",
        r"hearing\s+aid",
        r"monitor",
    ],
    "US_SSN": [r"ssn", r"social\s+security", r"soc\.?\s+sec\.?", r"ss#"],
}
# Words and signs between a label and its identifier: "Member ID:", "Health plan #:", "SSN on file:".
ID_FILLERS = r"(?:\s*(?:(?i:number|num|no\.?|nr\.?|id|code|is|of|was|on\s+file|details?|ending\s+in)\b\.?|[#:=]))*\s*"
ID_GROUP = r"\(?[A-Z0-9][A-Za-z0-9()/.\-]*[A-Za-z0-9)]|[0-9]"
ID_VALUE = rf"(?:{ID_GROUP})(?:[ ](?:{ID_GROUP})){{0,8}}"  # an IBAN of 34 characters is nine groups
MIN_ID_DIGITS = 2
MIN_ID_CHARS = 4


def _id_value(value: str) -> str | None:
    """The identifier at the start of ``value``: groups after the first need a digit or are short
    upper-case codes ("SN AA999999", "CX17 RLI"); at least 2 digits and 4 letters/digits."""
    groups = value.split(" ")
    kept = [groups[0]]
    for group in groups[1:]:
        has_digit = any(c.isdigit() for c in group)
        short_code = group.isupper() and len(group) <= 4  # "SN AA999999", "CX17 RLI"
        if not (has_digit or short_code):
            break
        kept.append(group)
    while len(kept) > 1 and not any(c.isdigit() for c in kept[-1]) and not any(c.isdigit() for c in kept[-2]):
        kept.pop()
    text = " ".join(kept).rstrip(".")
    if sum(c.isdigit() for c in text) < MIN_ID_DIGITS or sum(c.isalnum() for c in text) < MIN_ID_CHARS:
        return None
    return text


WORD_START = regex.compile(r"\b[A-Za-z]")


class CueIdentifierRecognizer(EntityRecognizer):
    """Identifiers after the label that names their kind; the longest label wins."""

    def __init__(self) -> None:
        alternatives = []
        for kind, cues in ID_CUES.items():
            for cue in cues:
                alternatives.append((kind, cue))
        self._cue = regex.compile(
            "|".join(f"(?P<c{k}>\\b{cue}\\b\\.?)" for k, (_, cue) in enumerate(alternatives)), regex.IGNORECASE
        )
        self._kinds = [kind for kind, _ in alternatives]
        self._value = regex.compile(ID_FILLERS + f"(?P<id>{ID_VALUE})")
        super().__init__(supported_entities=list(ID_CUES), name="CueIdentifierRecognizer", supported_language="en")

    def load(self) -> None:
        pass

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts = None) -> list[RecognizerResult]:
        cues = []
        # Every cue starts a word with a letter: trying the cue pattern at word starts only finds
        # what an overlapped search finds, in a third of the time.
        for start in WORD_START.finditer(text):
            match = self._cue.match(text, start.start())
            if match is None:
                continue
            cues.append((match.start(), match.end(), self._kinds[int(match.lastgroup[1:])]))
        # Longest cue first; a cue inside a longer one ("licence" in "licence plate") is dropped.
        cues.sort(key=lambda c: (c[0], -(c[1] - c[0])))
        kept = []
        for cue in cues:
            if not any(k[0] <= cue[0] and cue[1] <= k[1] for k in kept):
                kept.append(cue)
        results = []
        for _, end, kind in kept:
            if kind not in entities:
                continue
            match = self._value.match(text, end)
            if match is None:
                continue
            value = _id_value(match.group("id"))
            if value is None:
                continue
            begin = match.start("id")
            results.append(RecognizerResult(kind, begin, begin + len(value), LABELLED_ID_SCORE))
        return results


# --- patterns ---------------------------------------------------------------------------------

_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?"
)
_WEEKDAY = r"(?:Mon|Tues?|Wed(?:nes)?|Thu(?:rs)?|Fri|Sat(?:ur)?|Sun)(?:day)?\.?"
_DAY = r"(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?"
_YEAR = r"(?:1[89]\d\d|20\d\d|'\d\d)"
_DM = r"(?:0?[1-9]|[12]\d|3[01])"
_MM = r"(?:0?[1-9]|1[0-2])"
DATE_PATTERNS = [
    Pattern(
        "[Weekday,] Month d[, yyyy]", rf"\b(?:{_WEEKDAY},?[ \t]+)?{_MONTH}[ \t]+{_DAY}\b(?:,?[ \t]+{_YEAR}\b)?", 0.6
    ),
    Pattern(
        "[Weekday,] d [of] Month [yyyy]",
        rf"\b(?:{_WEEKDAY},?[ \t]+)?{_DAY}[ \t]+(?:of[ \t]+)?{_MONTH}(?:,?[ \t]+{_YEAR}\b)?",
        0.6,
    ),
    Pattern("Month yyyy", rf"\b{_MONTH}[ \t]+(?:of[ \t]+)?{_YEAR}\b", 0.5),
    Pattern("d-Mon-yyyy", rf"\b{_DM}[-/ ](?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*[-/ ]{_YEAR}\b", 0.6),
    Pattern("d/m/yyyy, m/d/yy, d.m.yyyy, d-m-yyyy", rf"\b{_DM}[/.-]{_DM}[/.-](?:\d{{4}}|\d{{2}})\b(?![/.-]\d)", 0.6),
    Pattern("yyyy-mm-dd, yyyy/mm/dd, yyyy.mm.dd", rf"\b\d{{4}}[/.-]{_MM}[/.-]{_DM}\b", 0.6),
    # Partial numeric dates only after a word that introduces a date ("on 3/14", "since 14.3.").
    Pattern(
        "m/d after a date word",
        rf"(?<=\b(?:on|since|from|until|till|by|dated?|due|seen|before|after|of|DOB|DOS|admitted|discharged|note|visit|admission|discharge|appointment|surgery|procedure|today)[:\s]+){_DM}[/.]{_DM}\b\.?(?![/.]?\d)",
        0.6,
    ),
]
DATE_CONTEXT = ["date", "dob", "born", "birth", "admitted", "discharged", "seen", "visit", "on"]

_AGE = r"(?:9\d|1[0-2]\d)"
AGE_PATTERNS = [
    Pattern(
        "NN-year-old, NN y/o, NN yo",
        rf"\b{_AGE}(?=[ \t-]*(?:-|[ \t])?(?:years?|yrs?|y)[ \t-]*(?:-|[ \t])?(?:old|o\b|/o\b|\.o\.)|[ \t]?(?:yo|y/o|y\.o\.|yrs?|years)\b)",
        0.7,
    ),
    Pattern("aged NN, age: NN", rf"(?<=\b(?:[Aa]ged?|AGE|[Aa]et\.?|[Aa]t[ \t]+age)[ \t]*[:=]?[ \t]*){_AGE}\b", 0.7),
    # Set off by commas after a name or place: "Mr. Lasonder, 93, returned", "Resident of Skien, 91, lives".
    Pattern("name, NN,", rf"(?<=\p{{L}}\.?,[ \t]){_AGE}(?=,)", 0.5),
    Pattern("in his/her 90s", r"\b(?:in[ \t]+(?:his|her|their)[ \t]+)(?:nineties|90s|100s)\b", 0.6),
]

PHONE_CONTEXT = ["phone", "telephone", "tel", "cell", "cellphone", "mobile", "call", "callback", "fax", "contact",
                 "reach", "number", "ring", "text", "whatsapp", "ph", "mob", "landline", "registered", "office",
                 "message", "messages", "sms", "voicemail", "spoke", "dial", "dialled", "dialed"]  # fmt: skip
_PHONE_SEP = r"[ \t.\-/]?"
PHONE_PATTERNS = [
    # +CC / 00CC, then 6-13 more digits in groups: "+49-9371-52821669", "+7-(966)-397-59-64".
    Pattern(
        "international",
        rf"(?<![\w+])(?:\+|00)[1-9]\d{{0,2}}{_PHONE_SEP}(?:\(\d{{1,4}}\){_PHONE_SEP})?\d{{1,5}}(?:{_PHONE_SEP}\d{{1,5}}){{1,5}}\b",
        0.6,
    ),
    Pattern(
        "North American",
        r"(?<![\w+-])(?:\(\d{3}\)[ ]?|\d{3}[-. ])\d{3}[-. ]\d{4}(?:[ ]?(?:x|ext\.?)[ ]?\d{1,6})?\b",
        0.5,
    ),
    # National: a leading 0 or area code in parentheses, then groups: "025 4263 0228", "(0)30 1234567".
    Pattern(
        "national, trunk 0", r"(?<![\w+/.-])\(?0\d{1,4}\)?[ \t.\-/]?\d{2,4}(?:[ \t.\-]\d{2,4}){1,3}\b(?![/.-]\d)", 0.4
    ),
    # Shapes few other numbers take: an area code in parentheses, a trunk 0 and one long group,
    # three groups of three, "3-2-3" and a country code with one-digit area ("372-4-3100-2994").
    Pattern("(area) number", r"(?<![\w+])\(\d{2,5}\)[ \t.\-]?\d{3,4}(?:[ \t.\-]?\d{2,4}){0,2}\b", 0.4),
    Pattern("trunk 0, one group", r"(?<![\w+/.-])0\d{1,4}[ \t\-/]\d{6,8}\b(?![/.-]\d)", 0.4),
    # Digits before the label of a line: "26 590425-Office", "33 4455 (home)".
    Pattern(
        "digits before a phone label",
        r"(?<![\w+/.-])\+?\d[\d \t.\-]{4,16}\d(?=[ \t]*[-(][ \t]*(?i:office|fax|home|mobile|cell|work|tel)\b)",
        0.5,
    ),
    Pattern("ddd ddd ddd, ddd dd ddd", r"(?<![\w+/.-])\d{3}([ .\-])(?:\d{3}|\d{2})\1\d{3}\b(?![/.-]\d)", 0.4),
    Pattern("cc-d-dddd-dddd", r"(?<![\w+/.-])\d{1,3}([ .\-])\d{1,2}\1\d{3,4}\1\d{4}\b(?![/.-]\d)", 0.4),
    # Digit groups (two to five) only count next to a phone word.
    Pattern("digit groups (needs context)", r"(?<![\w+/.-])\d{2,4}(?:[ \t.\-]\d{2,4}){1,4}\b(?![/.-]\d)", 0.1),
    Pattern("7-12 digits (needs context)", r"(?<![\w+/.-])\d{7,12}\b(?![/.-]\d)", 0.15),
]

_CAP = r"\p{Lu}[\p{L}'’.\-]*"
_LINK = r"(?:de|da|do|dos|das|del|dei|degli|delle|della|dello|di|la|le|las|los|du|des|von|van|der|den|y|e|i|al|el|of|the|and|St\.?)"
_ORDINAL = r"\d+(?:st|nd|rd|th)"
# Words of a street's name; the last one may be an ordinal ("43rd Avenue").
_NAME_WORDS = rf"(?:(?:{_CAP}|{_LINK}|\d+(?:st|nd|rd|th)?)[ \t]+){{0,4}}(?:{_CAP}|{_ORDINAL})"
_NUMBER = r"\d{1,5}(?:[ \t]?[A-Za-z](?![\p{L}]))?(?:[-/]\d{1,4}[A-Za-z]?)?"
# A house number after the street name has at most 4 digits: ", 69003" after it is a postal code.
# "18 A 5": a staircase letter and a flat number after the house number (Nordic addresses).
_HOUSE = r"\d{1,4}(?:[ \t]?[A-Za-z](?![\p{L}:])(?:[ \t]\d{1,3}(?![\d.,:/-]\d))?)?(?:[-/]\d{1,4}[A-Za-z]?)?(?!\d)"
# A house number's label: "No. 45", "Nr 7", "nº 3", "d. 15" (Russian dom), "#12".
_HOUSE_LABEL = r"(?:(?:No|Nr|N[º°o]|n[º°o]|d|dom|\#)[.:]?[ \t]*)"
# Units after the number; "D:4" / "Daire 4" (Turkish door), "kv. 3" and "korp. 2" (Russian).
_UNIT = r"(?:,?[ \t]+(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Flat|Floor|Fl\.?|Room|Rm\.?|\#|Bus|Box|Whg\.?|Stock|piso|esc\.?|bte|D:|Daire|kv\.?|korp\.?)[ \t]*[A-Za-z0-9\-]+)*"


# Street types that start a street's name and are not everyday English words (not "via").
NAME_FIRST_STREET_TYPES = ["rue", "avenida", "avda.", "boulevard", "bd", "bvd", "calle", "carrer", "rua", "travessa",
                           "c/", "ctra.", "rúa", "passeig", "rambla", "trg", "náměstí", "bulevar", "bulevardul",
                           "piazza", "piazzale", "viale", "corso", "ul.", "ulica", "al.", "aleja", "strada", "calea",
                           "chemin", "impasse", "allée", "quai", "plac", "utca", "ulitsa", "prospekt"]  # fmt: skip
# English types that end a street's name and are no everyday word when capitalised after one.
NAME_LAST_STREET_TYPES = ["Street", "St.", "Road", "Rd.", "Avenue", "Ave.", "Boulevard", "Blvd.", "Lane", "Ln.",
                          "Terrace", "Crescent", "Highway", "Hwy.", "Parkway", "Pkwy.", "Strasse", "Straße"]  # fmt: skip
# Street types of other languages that are no English word: the rest of the street's name may
# be lower case beside them ("Tas vezér u.", "Søren Jaabæks vei", "Trg bana Jelačića").
# Abbreviations count only with their full stop ("u." but not the "U" of "DL U664-5126").
FOREIGN_STREET_TYPES = ["utca", "u.", "út", "útja", "tér", "tere", "körút", "krt.", "köz", "sétány", "fasor", "rakpart",
                        "lakótelep", "ltp.", "ulica", "ulice", "ul.", "trg", "cesta", "vei", "veien", "vegen", "vej",
                        "gata", "gatan", "gade", "tänav", "maantee", "põik", "iela", "gatvė", "prospekt", "pereulok",
                        "ulitsa", "shosse", "sokak", "sokağı", "caddesi", "cad.", "bulvarı", "vulytsia", "náměstí",
                        "nábřeží", "námestie"]  # fmt: skip
# Fused street suffixes that end no English word or common name, so mark a street without its number.
UNAMBIGUOUS_FUSED_SUFFIXES = ["straße", "strasse", "gasse", "straat", "gracht", "vej", "gatan", "vägen", "veien",
                              "vegen", "katu", "tänav", "utca", "iela", "gatvė", "chaussee", "stræde", "gränd"]  # fmt: skip
# A postal code (letters of a country prefix, "12-345", "1234-567", "123 45", "12345") and a town
# name (capitalised or all capitals), as they follow a street.
_POSTAL = r"(?:[A-Z]{1,2}-?)?(?:\d{2}-\d{3}|\d{3,6}(?:[ \t-]\d{2,4})?)"
_TOWN = r"\p{Lu}[\p{L}'’.\-]+"
STREET_TYPE_FIRST_SCORE = 0.9  # above the NER's: "Avenida Tancredo Neves" is a street, not a person
_CAP_WORD = r"\p{Lu}[\p{L}'’\-]*"  # a capitalised word, without a sentence's full stop
_NAME_LINK = r"(?:de|da|do|dos|das|del|della|di|la|le|du|des|von|van|der|den|y)"

ADDRESS_CUES = (
    r"address(?:es)?|addr\.?|lives?[ \t]+at|living[ \t]+at|resides?[ \t]+at|residing[ \t]+at|moved[ \t]+to|"
    r"mail(?:ed)?[ \t]+to|sen[dt][ \t]+to|return(?:ed)?[ \t]+to|ship(?:ped)?[ \t]+to|deliver(?:ed)?[ \t]+to|"
    r"lives?[ \t]+in|located[ \t]+at|home[ \t]+at|staying[ \t]+at"
)
# Words between an address cue and the address: "address is", "address on file was", "address
# updated to", "address has changed to".
_CUE_FILLER = r"(?:[ \t]+(?i:is|was|are|now|on[ \t]+file|of[ \t]+record|updated|changed|has|will[ \t]+be|to)\b)*"
_WORD = r"[\p{L}][\p{L}'’.\-]*"
# Words that end a street name: "Mail to PSC 2076" is not a street.
_NOT_STREET = r"(?i:to|at|in|on|from|for|is|it|was|are|by|with|my|your|our|his|her|their|and|or)"
_CUED_ADDRESS = (
    rf"(?:{_NUMBER},?[ \t]+(?:(?!{_NOT_STREET}\b){_WORD}[ \t]+){{0,4}}(?!{_NOT_STREET}\b){_WORD}"  # number first
    rf"|(?:(?!{_NOT_STREET}\b){_WORD}[ \t]+){{0,4}}{_WORD},?[ \t]+{_HOUSE}\b){_UNIT}"  # number last
)


def _alternation(words) -> str:
    """A regex for any of ``words``, as a trie: it matches what the plain alternation sorted
    longest first matches (of two words matching at one place, one is a prefix of the other, and
    both forms try the longer first), but tests a position against a few letters instead of
    every word, which made the street patterns the slowest part of a scan."""
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: dict) -> str:
        branches = [regex.escape(char) + pattern(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if "" in node:
            return f"(?:{body})?"
        return body

    return pattern(trie)


def address_patterns(lexicon: Lexicon) -> list[Pattern]:
    types = _alternation(lexicon.street_types)
    fused = _alternation(lexicon.fused_street_suffixes)
    foreign = _alternation(FOREIGN_STREET_TYPES)
    street_type = rf"(?i:{types})\.?"
    return [
        # "1234 Oak Street", "524 Lindstrand Row", "221B Baker St., Apt 4"
        Pattern("number, name, type", rf"\b{_NUMBER},?[ \t]+{_NAME_WORDS}[ \t]+{street_type}(?![\p{{L}}]){_UNIT}", 0.7),
        # "274 Impasse Frederic Chopin", "12 rue de la Paix"
        Pattern("number, type, name", rf"\b{_NUMBER},?[ \t]+{street_type}[ \t]+{_NAME_WORDS}{_UNIT}", 0.7),
        # "Calle Miguel Zazo, 284", "Via Roma 1", "ul. Długa 5", "Rua General Cardoso 454"
        Pattern(
            "type, name, number",
            rf"(?<![\p{{L}}]){street_type}[ \t]+{_NAME_WORDS},?[ \t]+{_HOUSE_LABEL}?{_HOUSE}\b{_UNIT}",
            0.7,
        ),
        # "Levetzowstraße 1058", "Högtoftavägen 969", "Heinrich-Heine-Str. 12", "Kloosterkoolhof 1304"
        Pattern(
            "name+suffix, number",
            rf"(?<![\p{{L}}])(?:{_CAP}[ \t-])*\p{{Lu}}[\p{{L}}\-]*(?i:{fused})\.?,?[ \t]+{_HOUSE}\b{_UNIT}",
            0.7,
        ),
        # "Abşar Sokağı 716", "Karu põik 61", "Heuvel St 12", "Atatürk Caddesi No: 45"
        Pattern(
            "name, type, number",
            rf"(?<![\p{{L}}]){_NAME_WORDS}[ \t]+{street_type},?[ \t]+{_HOUSE_LABEL}?{_HOUSE}\b{_UNIT}",
            0.7,
        ),
        # Types that are no English word may follow lower-case words of the name, with or without
        # a number: "Tas vezér u. 38.", "Søren Jaabæks vei", "Gosposka ulica", "Trg bana Jelačića 3".
        Pattern(
            "name words, foreign type[, number]",
            rf"(?<![\p{{L}}])(?!{_NOT_STREET}\b)\p{{Lu}}[\p{{L}}'’\-]*(?:[ \t]+(?!{_NOT_STREET}\b)[\p{{L}}'’.\-]+){{0,3}}[ \t]+(?i:{foreign})(?![\p{{L}}])(?:,?[ \t]+{_HOUSE_LABEL}?{_HOUSE}\b)?{_UNIT}",
            0.6,
        ),
        Pattern(
            "foreign type, name words, number",
            rf"(?<![\p{{L}}])(?i:{foreign})[ \t]+(?:(?!{_NOT_STREET}\b)[\p{{L}}'’.\-]+[ \t]+){{0,3}}\p{{Lu}}[\p{{L}}'’.\-]*,?[ \t]+{_HOUSE_LABEL}?{_HOUSE}\b{_UNIT}",
            0.6,
        ),
        # Any number-bearing run of words after an address cue: "lives at 1097 Melshorn", "Address: Am Sack 689".
        Pattern(
            "after an address cue",
            # The cue is matched and then dropped from the span (\K): tried only where a cue starts,
            # a fifth of the time the same lookbehind took at every position.
            rf"\b(?i:{ADDRESS_CUES}){_CUE_FILLER}[ \t]*[:\-]?[ \t]*(?:\n[ \t]*){{0,2}}\K(?<![\p{{L}}\d]){_CUED_ADDRESS}",
            0.6,
        ),
        # "Melum 64, Finnbogastaðir 523", "Vinohradská 12, 120 00 Praha", "Dyvik 46, KÖPMANHOLMEN
        # 890 14": a street and its number, then a town and its postal code or a code and its town.
        Pattern(
            "street number, town code",
            rf"(?<![\p{{L}}\d])\p{{Lu}}\p{{Ll}}[\p{{L}}'’.\-]*(?:[ \t]+(?!{_NOT_STREET}\b){_WORD}){{0,3}}[ \t]+{_HOUSE}\.?(?=,[ \t]+(?:{_TOWN}(?:[ \t]+[\p{{L}}'’.\-]+){{0,3}}(?:[ \t]+(?:\d{{1,2}}|[A-Z]{{1,2}}))?[ \t]+{_POSTAL}|{_POSTAL}[ \t]+{_TOWN})\b)",
            0.6,
        ),
        # An address label's street line: a number and words alone on their line ("2250 Brisas").
        Pattern(
            "label line",
            rf"(?m)(?<=^[ \t>?*•\-]*|\b(?:Apt\.?|Suite|Unit)[ \t]+\d{{1,5}}[ \t]+)\d{{1,5}}[A-Za-z]?[ \t]+(?:\p{{Lu}}[\p{{L}}'’.\-/]*|{_ORDINAL})(?:[ \t]+[\p{{L}}'’.\-]+){{0,4}}\.?{_UNIT}(?=[ \t]*$)",
            0.5,
        ),
        # "60 Hauptplatz", "1161 Strømstadgata"
        Pattern(
            "number, name+suffix", rf"\b{_NUMBER},?[ \t]+\p{{Lu}}[\p{{L}}\-]*(?i:{fused})(?![\p{{L}}])\.?{_UNIT}", 0.7
        ),
        # A unit on its own ("Apt. 442", "Suite 824"), as on an address label's second line.
        Pattern("unit", r"\b(?:Apt\.?|Apartment|Suite|Ste\.|Unit|Flat)[ \t]*\#?[ \t]*\d{1,5}[A-Za-z]?\b", 0.5),
        # A street named without its number: a type first ("on rue La Boétie", "ul. Kazimierza
        # Wielkiego"), or an unambiguous English type after the name ("Quadra St.", "Kieler Strasse St.").
        Pattern(
            "type, name (no number)",
            rf"(?<![\p{{L}}.])(?i:{_alternation(NAME_FIRST_STREET_TYPES)})[ \t]+(?:{_NAME_LINK}[ \t]+){{0,2}}{_CAP_WORD}(?:[ \t]+(?:{_NAME_LINK}[ \t]+)?{_CAP_WORD}){{0,3}}",
            STREET_TYPE_FIRST_SCORE,
        ),
        Pattern(
            "name, type (no number)",
            rf"(?<![\p{{L}}]){_CAP_WORD}(?:[ \t]+{_CAP_WORD}){{0,3}}[ \t]+{_alternation(NAME_LAST_STREET_TYPES)}(?![\p{{L}}])",
            0.5,
        ),
        # "on Alingsåsvägen", "on Højbovej": suffixes that end no English word or name.
        Pattern(
            "name+suffix (no number)",
            rf"(?<![\p{{L}}])\p{{Lu}}[\p{{L}}\-]*(?i:{_alternation(UNAMBIGUOUS_FUSED_SUFFIXES)})(?![\p{{L}}])",
            0.5,
        ),
        Pattern(
            "Via, name (no number)",
            rf"(?<=\p{{Ll}}[ \t]+)Via[ \t]+(?:{_NAME_LINK}[ \t]+){{0,2}}{_CAP_WORD}(?:[ \t]+(?:{_NAME_LINK}[ \t]+)?{_CAP_WORD}){{0,3}}",
            0.5,
        ),
        Pattern("P.O. box", r"\b(?:P\.?[ \t]?O\.?[ \t]?Box|Postfach|Apartado|Caixa[ \t]Postal)[ \t]+\d{1,6}\b", 0.7),
        Pattern(
            "APO/FPO military",
            r"\b(?:PSC|Unit|CMR)[ \t]+\d{3,5},?[ \t]+Box[ \t]+\d{3,5}(?:,?[ \t]+|[ \t]*\n[ \t]*)(?:APO|FPO|DPO)[ \t]+(?:AA|AE|AP)[ \t]+\d{5}",
            0.7,
        ),
    ]


POSTAL_PATTERNS = [
    Pattern("UK postcode", r"\b[A-Z]{1,2}\d[A-Z\d]?[ \t]?\d[A-Z]{2}\b", 0.6),
    Pattern("Canadian postal code", r"\b[A-Z]\d[A-Z][ \t]?\d[A-Z]\d\b", 0.6),
    Pattern("Dutch postcode", r"\b[1-9]\d{3}[ \t]?[A-Z]{2}\b(?![\p{L}])", 0.4),
    Pattern("ZIP+4, Brazilian CEP", r"\b\d{5}-\d{3,4}\b", 0.5),
    Pattern("Portuguese, Polish", r"\b\d{4}-\d{3}\b|\b\d{2}-\d{3}\b", 0.3),
    Pattern(
        "postal code after its label",
        r"(?<=\b(?i:zip|zip[ \t]?code|postal[ \t]code|post[ \t]?code|plz|cp|code[ \t]postal|cap)\b[ \t]*[:#]?[ \t]*)[A-Z0-9]{2,5}(?:[ \t-][A-Z0-9]{2,4})?\b",
        0.7,
    ),
]
POSTAL_CONTEXT = ["zip", "postcode", "postal", "address", "city"]

SHAPE_PATTERNS = {
    "VEHICLE_ID": [Pattern("VIN", r"\b(?=[A-HJ-NPR-Z0-9]{17}\b)(?=\w*\d)(?=\w*[A-Z])[A-HJ-NPR-Z0-9]{17}\b", 0.5)],
    "DEVICE_ID": [
        Pattern("GS1 UDI", r"\(01\)\d{14}(?:\(\d{2,4}\)[A-Za-z0-9]{1,20})*", 0.7),
        Pattern("IMEI (needs context)", r"\b\d{15}\b", 0.2),
    ],
    "HEALTH_PLAN_NUMBER": [
        Pattern(
            "Medicare MBI",
            r"\b[1-9][AC-HJKMNP-RT-Y][AC-HJKMNP-RT-Y0-9]\d-?[AC-HJKMNP-RT-Y][AC-HJKMNP-RT-Y0-9]\d-?[AC-HJKMNP-RT-Y]{2}\d{2}\b",
            0.6,
        )
    ],
    "US_SSN": [
        Pattern("SSN shape (needs context)", r"\b(?!000|666|9\d\d)\d{3}[- ]?(?!00)\d{2}[- ]?(?!0000)\d{4}\b", 0.3)
    ],
}
SHAPE_CONTEXT = {
    "VEHICLE_ID": ["vin", "vehicle", "car"],
    "DEVICE_ID": ["imei", "device", "serial", "udi"],
    "HEALTH_PLAN_NUMBER": ["medicare", "mbi", "member"],
    "US_SSN": ["ssn", "social", "security"],
}


def pattern_recognizers(lexicon: Lexicon) -> list[PatternRecognizer]:
    def recognizer(
        entity: str, name: str, patterns: list[Pattern], context: list[str] | None = None
    ) -> PatternRecognizer:
        return PatternRecognizer(supported_entity=entity, name=name, patterns=patterns, context=context,
                                 global_regex_flags=CASE_SENSITIVE)  # fmt: skip

    recognizers = [
        recognizer("DATE_TIME", "FedgenDateRecognizer", DATE_PATTERNS, DATE_CONTEXT),
        recognizer("AGE", "AgeOver89Recognizer", AGE_PATTERNS, ["age", "aged", "old"]),
        recognizer("PHONE_NUMBER", "PhoneShapeRecognizer", PHONE_PATTERNS, PHONE_CONTEXT),
        recognizer(
            "STREET_ADDRESS",
            "StreetAddressRecognizer",
            address_patterns(lexicon),
            ["address", "lives", "live", "street", "reside"],
        ),
        recognizer("POSTAL_CODE", "PostalCodeRecognizer", POSTAL_PATTERNS, POSTAL_CONTEXT),
    ]
    for entity, patterns in SHAPE_PATTERNS.items():
        recognizers.append(
            recognizer(entity, f"{entity.title().replace('_', '')}ShapeRecognizer", patterns, SHAPE_CONTEXT[entity])
        )
    return recognizers


# --- postal codes and cities beside an address ------------------------------------------------

_FOREIGN_POSTAL = r"[A-Z]\d[A-Z][ \t]?\d[A-Z]\d|[A-Z]{1,2}\d[A-Z\d]?[ \t]?\d[A-Z]{2}|\d{4}[ \t]?[A-Z]{2}(?![\p{L}])"
_CODE = rf"(?:{_FOREIGN_POSTAL}|{_POSTAL}(?![\d]|[.:/-]\d))"  # not the start of an IP address or a date
_LINE_BREAKS = r"(?:[ \t]*\n[ \t>?*•-]*)+"  # one or more line breaks, blank lines and a label's marks
_PLACE_LINK = (
    r"(?:de|la|le|las|los|del|da|do|dos|das|di|am|an|im|in|der|den|sur|sous|en|i|í|á|aan|nad|pod|pri|na|bei|ob|upon|on)"
)
_PLACE_CAP = r"\p{Lu}[\p{L}'’.\-]+(?![\p{L}\p{N}])"
# A town's next word does not follow a full stop after a word (a sentence's end: "Zagreb. Call"),
# only after an abbreviation ("St. Gallen").
_PLACE_JOIN = r"(?<!\p{L}{3}\.)[ \t-]"
# Between a town and its code: a district number or letter ("Ostrava 3", "København K") or a
# region's abbreviation ("Hernani SS 20120"), on the line or on a line of its own.
_BETWEEN = r"(?:(?:\d{1,2}|[A-Z]{1,3})(?:[ \t]+|" + _LINE_BREAKS + r"))"
_BESIDE_AFTER = regex.compile(
    rf"\G(?P<sep>\.?,?[ \t]*(?:\n[ \t>?*•-]*)?)(?:(?P<code1>{_CODE})(?:,?[ \t]+|$))?"
    # A town: capitalised words and the small words that join them; lower-case words too when a code follows.
    rf"(?P<city>(?<![.][ \t]*){_PLACE_CAP}(?:{_PLACE_JOIN}[\p{{L}}'’\-]+){{1,3}}(?=,?[ \t]+{_BETWEEN}?{_CODE})"
    rf"|{_PLACE_CAP}(?:{_PLACE_JOIN}(?:{_PLACE_LINK}[ \t-]){{0,2}}{_PLACE_CAP}){{0,3}}(?:[ \t]\p{{Lu}}(?=[ \t]*(?:[\n,.]|\Z)|[ \t]+\d)|[ \t]\d{{1,2}}(?=[ \t]+\d{{3}}))?)?"
    rf"(?:(?:,?[ \t]+|{_LINE_BREAKS})(?:(?P<code2>[A-Z]{{2}}[ \t]+\d{{5}}(?:-\d{{4}})?)|{_BETWEEN}{{0,2}}(?P<code2>{_CODE})))?"
)
_CODE_BEFORE = regex.compile(rf"(?<![\w-])(?P<code>{_CODE})[ \t]+\Z")
# After a town on its line a code has four digits or more ("Tromsø, 101," is an age), or "123 45";
# on a line of its own, any code.
_LONG_CODE = rf"(?:{_FOREIGN_POSTAL}|(?:[A-Z]{{1,2}}-?)?(?:\d{{2}}-\d{{3}}|\d{{3}}[ \t]\d{{2}}|\d{{4,6}}(?:[ \t-]\d{{2,4}})?)(?!\d))"
_CODE_AFTER = regex.compile(
    rf"\G(?:,?[ \t]+{_BETWEEN}{{0,2}}(?P<code>{_LONG_CODE})|{_LINE_BREAKS}{_BETWEEN}{{0,2}}(?P<code>{_CODE}))\b"
)
_PLACE_WORD = regex.compile(r"[\p{L}'’\-]+")


_COUNTRY_CODE = regex.compile(
    r"(?P<place>\p{Lu}[\p{L}]+(?:[ \t]\p{Lu}[\p{L}]+){0,2})(?:[ \t]+\([\p{L} ]+\))?[ \t]+(?P<code>\d{3,6}(?:[ \t-]\d{2,4})?|\d{2}-\d{3})\b"
)
# A town right after a street address outranks a name read into the same words
# ("Villanueva de la Serena" on the line after a street is a town, whatever "Serena" is).
TOWN_AFTER_STREET_SCORE = 0.9
ATTACH_PASSES = 3  # an address label: street, unit line, city line, country line


def attach_places(
    text: str, spans: list[tuple[str, int, int, float]], lexicon: Lexicon
) -> list[tuple[str, int, int, float]]:
    """Postal codes and cities right after a street address or around a city finding, and the
    postal code after a country or state name ("Australia 3951").

    ``spans`` are (entity_type, start, end, score); returns the new ones to add.
    """
    added: list[tuple[str, int, int, float]] = []
    for match in _COUNTRY_CODE.finditer(text):
        if fold(match.group("place")) in lexicon.not_phi_places:
            added.append(("POSTAL_CODE", match.start("code"), match.end("code"), 0.5))
    todo = list(spans)
    for _ in range(ATTACH_PASSES):
        new = _attach_once(text, todo, lexicon)
        added += new
        todo = [s for s in new if s[0] == "LOCATION" or s[0] == "STREET_ADDRESS"]
        if not todo:
            break
    return added


def _attach_once(text: str, spans, lexicon: Lexicon) -> list[tuple[str, int, int, float]]:
    added = []
    for entity, start, end, score in spans:
        if entity == "STREET_ADDRESS":
            match = _BESIDE_AFTER.match(text, end)
            if match is None or match.end() == end:
                continue
            for group in ("code1", "code2"):
                if match.group(group):
                    added.append(("POSTAL_CODE", match.start(group), match.end(group), score))
            if match.group("city"):
                city = match.group("city").rstrip(".")
                words = [fold(w) for w in _PLACE_WORD.findall(city)]
                # English words after a street are a town only beside its code or alone on a label's line.
                coded = match.group("code1") or match.group("code2")
                own_line = "\n" in match.group("sep") and LINE_END.match(text, match.end("city"))
                if words and (
                    coded or own_line or not all(lexicon.is_word(w) and fold(city) not in lexicon.cities for w in words)
                ):
                    if fold(city) not in lexicon.not_phi_places:
                        city_score = max(score, TOWN_AFTER_STREET_SCORE)
                        added.append(("LOCATION", match.start("city"), match.start("city") + len(city), city_score))
        elif entity == "LOCATION":
            before = _CODE_BEFORE.search(text, 0, start)
            if before is not None:
                added.append(("POSTAL_CODE", before.start("code"), before.end("code"), score))
            after = _CODE_AFTER.match(text, end)
            if after is not None:
                added.append(("POSTAL_CODE", after.start("code"), after.end("code"), score))
    return added
