"""A public corpus of short mental-health teaching-case notes, one per assessment class.

What it is: a seeded generator of de-identified "textbook vignette" notes for the five classes of
`MENTAL_HEALTH_CLASSES`. Every sentence was written for this module from public clinical knowledge
(DSM-5-TR criteria, ICD-11 descriptions, the PHQ-9, GAD-7, PSS-10 and C-SSRS instruments, NICE and
APA guideline management), never from the sites' notes, and none names a person, date, place or
record number.

Why it exists: a consortium can declare text like this non-sensitive, so the text adapter can be
pretrained on it without differential privacy. The sites' DP fine-tuning then spends its privacy
budget on what only the sites have (their wording, case mix and detail), not on learning what a
clinical note looks like.

Each note follows one of a few structures (narrative, headed History / Risk / Impression / Plan,
SOAP-like, brief) and draws each part from a per-class pool. With probability `BORROW_P` a
symptom or functioning sentence comes from a clinically related class (anxiety-depression,
stress-anxiety, depression within suicidality), so the classes overlap as real notes do; the
reason for contact, risk, impression and plan always come from the note's own class.
"""

from __future__ import annotations

import numpy as np

from fedgen.config import MENTAL_HEALTH_CLASSES
from fedgen.errors import FedgenError

__all__ = ["PUBLIC_NOTE_SOURCE", "make_public_notes"]

PUBLIC_NOTE_SOURCE = (
    "Synthetic mental-health teaching-case vignettes written independently from public clinical knowledge "
    "(DSM-5-TR, ICD-11, PHQ-9, GAD-7, PSS-10, C-SSRS, NICE and APA guidance), containing no patient data."
)

BORROW_P = 0.2  # chance that a symptom or functioning sentence comes from a related class
MAX_WORDS = 90
MAX_SENTENCES = 6

# A comorbid sentence is borrowed from a milder or sibling class, never from a more severe one, so
# a note's label stays clinically faithful (a Depression note does not gain a suicide plan).
_RELATED = {
    "Normal": (),
    "Anxiety": ("Depression", "Stress"),
    "Depression": ("Anxiety",),
    "Stress": ("Anxiety",),
    "Suicidal": ("Depression",),
}
_BORROWABLE = ("symptoms", "function")

# Sentences that fit a note of any class: mental state examination, then context of the assessment.
_MSE = (
    "Appropriately dressed and cooperative throughout the interview.",
    "No evidence of psychotic symptoms such as hallucinations or delusions.",
    "Alert and oriented, with reasonable insight into the current difficulties.",
    "Thought form was coherent and cognition appeared grossly intact.",
    "Engaged well with the assessment after some initial hesitancy.",
    "No formal thought disorder was noted and speech was easy to follow.",
    "Judgement appeared intact and there were no perceptual abnormalities.",
    "Eye contact was limited at first but improved as the interview went on.",
)
_CONTEXT = (
    "Collateral history from a family member was consistent with the account given.",
    "Physical examination and routine blood tests were unremarkable.",
    "Current medications were reviewed and no interactions were identified.",
    "Consent was given for the findings to be shared with the general practitioner.",
    "Seen alone for part of the appointment, in line with usual practice.",
)
_SHARED = {"mse": _MSE, "shared": _MSE + _CONTEXT}

_POOLS: dict[str, dict[str, tuple[str, ...]]] = {
    "Normal": {
        "reason": (
            "Seen for a routine wellbeing check as part of an occupational health review.",
            "Attended a primary care screening appointment with no specific mental health concerns.",
            "Self-referred after a friend's illness prompted a wish to check on their own wellbeing.",
            "Referred for a pre-employment health assessment that includes a brief mental health screen.",
            "Presents for an annual health check and completed the standard mood questionnaires beforehand.",
            "A student attended the campus health service for a routine wellness consultation.",
            "Requested a review to confirm that a brief low patch some months ago has fully resolved.",
            "Attends a postnatal check, where mood screening is part of standard care.",
        ),
        "symptoms": (
            "Reports stable mood, good energy and continued interest in usual activities.",
            "PHQ-9 score of 2 and GAD-7 score of 1, both within the normal range.",
            "Describes ordinary day-to-day worries that are proportionate and easily set aside.",
            "No persistent low mood, loss of interest, excessive worry or panic attacks are described.",
            "Occasional sadness after minor setbacks resolves within a day or two without help.",
            "Denies any period of two weeks or more with low mood or loss of interest.",
            "Screening questionnaires are negative for depression, anxiety and harmful alcohol use.",
            "Feels able to cope with current demands and describes life as generally satisfying.",
            "Perceived Stress Scale score is low and in keeping with everyday pressures.",
        ),
        "function": (
            "Sleeps seven to eight hours most nights and wakes feeling rested.",
            "Appetite and weight are stable, with no change in eating habits.",
            "Working full time without difficulty and keeps up regular exercise.",
            "Maintains close friendships and enjoys regular contact with family.",
            "Concentration at work and study is described as good, with no recent decline.",
            "Takes part in hobbies and social activities as often as usual.",
            "Alcohol intake is within recommended limits and no other substances are used.",
            "Manages household responsibilities and finances without reported strain.",
        ),
        "risk": (
            "Denies any thoughts of self-harm or suicide, now or in the past.",
            "No suicidal ideation, intent or history of self-harm; risk is assessed as low.",
            "No concerns about harm to self or others were raised or identified.",
            "Negative on the C-SSRS screening questions for suicidal thoughts and behaviour.",
            "Reports no hopelessness and speaks positively about plans for the future.",
            "No risk indicators were identified and access to support is good.",
            "Has never self-harmed and has no thoughts of wanting to die.",
            "No safeguarding concerns, and lives in a stable household with good support.",
        ),
        "impression": (
            "Presentation is within normal limits, with no evidence of a current mental disorder.",
            "Mental health screening is negative and findings are within normal limits.",
            "Normal psychological functioning with appropriate coping resources.",
            "Criteria are not met for a depressive, anxiety or stress-related disorder.",
            "Mood and anxiety symptoms are absent or subclinical, with no functional impairment.",
            "The overall picture is one of good mental wellbeing.",
            "Transient worries are within the normal range and do not amount to a disorder.",
            "Well adjusted, with no indication for mental health treatment at present.",
        ),
        "plan": (
            "No treatment required, and routine screening will continue at the next annual review.",
            "Given general advice on sleep, exercise and limiting alcohol, with no follow-up needed.",
            "Signposted to self-help resources and advised to return if mood changes.",
            "Discharged from the clinic with open access should concerns arise.",
            "Encouraged to keep current routines and social contact, with no further action.",
            "Information on wellbeing services was provided for future reference.",
            "Reassured, and cleared for the occupational role from a mental health perspective.",
            "Will be rescreened at the next routine visit, and no referral is indicated.",
        ),
    },
    "Anxiety": {
        "reason": (
            "Referred by the general practitioner for persistent worry that feels impossible to control.",
            "Presents with recurrent episodes of sudden intense fear and a racing heart.",
            "Self-referred because anxiety in social situations is starting to affect work.",
            "Seen after several emergency visits for chest tightness with normal cardiac investigations.",
            "Attends reporting constant nervousness and feeling on edge for more than six months.",
            "Requested help with worry about health, family and money that has become overwhelming.",
            "Referred by student services after avoiding seminars for fear of embarrassment.",
            "Presents with fear of further panic attacks and avoidance of crowded places.",
            "Attends at the suggestion of a partner who has noticed constant reassurance seeking.",
        ),
        "symptoms": (
            "Describes excessive worry on most days for at least six months, with restlessness and muscle tension.",
            "GAD-7 score of 15, in the moderate to severe range.",
            "Panic attacks occur several times a week, with palpitations, sweating, trembling and fear of dying.",
            "Reports feeling keyed up, easily tired and irritable, with difficulty switching off.",
            "Worry jumps between topics and comes with headaches and an upset stomach.",
            "Fears being judged or humiliated when speaking in groups and avoids eating in public.",
            "Between attacks there is persistent concern about having another one.",
            "Describes breathlessness, dizziness and tingling hands during episodes of acute anxiety.",
            "Anticipatory anxiety starts days before social events and often leads to cancelling.",
        ),
        "function": (
            "Has trouble falling asleep because of racing thoughts, though appetite is preserved.",
            "Has reduced working hours because of poor concentration and frequent reassurance seeking.",
            "Avoids public transport and supermarkets, relying on others for shopping.",
            "Sleep is broken and unrefreshing, and caffeine intake has risen to cope with fatigue.",
            "Performance at work is maintained, but only with considerable effort.",
            "Has declined social invitations and turned down a promotion that involved presenting.",
            "Appetite drops when anxious, with occasional nausea in the mornings.",
            "Uses alcohol in the evenings to calm nerves and recognises this as unhelpful.",
        ),
        "risk": (
            "Denies suicidal ideation; the worries are about coping rather than wishing to die.",
            "No thoughts of self-harm, and risk to self is assessed as low.",
            "No suicidal thoughts; the fear during panic is of dying, not a wish to die.",
            "C-SSRS screen is negative and there is no history of self-harm.",
            "Reports no hopelessness and is keen to engage with treatment.",
            "No current risk to self or others, and protective factors include a supportive family.",
            "Denies any intent or plan to self-harm, though alcohol use will be monitored.",
            "No self-harm history, risk is low and no safety plan is needed at present.",
        ),
        "impression": (
            "Presentation meets criteria for generalised anxiety disorder.",
            "Features are those of panic disorder with emerging agoraphobic avoidance.",
            "Findings are consistent with social anxiety disorder of moderate severity.",
            "The clinical picture fits an anxiety disorder, most likely generalised anxiety with panic attacks.",
            "Symptoms are persistent, excessive and impairing, beyond ordinary worry.",
            "Moderate generalised anxiety disorder without a current depressive episode.",
            "Anxiety disorder with prominent physical symptoms and no evidence of psychosis.",
            "Anxiety disorder, with thyroid disease excluded by recent normal blood tests.",
        ),
        "plan": (
            "Offered individual cognitive behavioural therapy and psychoeducation about the anxiety cycle.",
            "Referred to a guided self-help programme, with review in four weeks.",
            "Discussed starting an SSRI such as sertraline, with information on early side effects.",
            "Taught a slow breathing technique for panic and advised to cut down on caffeine.",
            "Referred for cognitive behavioural therapy with graded exposure to avoided situations.",
            "Advised against regular benzodiazepines, and an SSRI was started at a low dose.",
            "Follow-up arranged to review GAD-7 scores and response to treatment.",
            "Given written information on panic disorder and details of an anxiety support group.",
        ),
    },
    "Depression": {
        "reason": (
            "Referred by the general practitioner with low mood that has lasted over two months.",
            "Presents after a partner noticed withdrawal, tearfulness and loss of interest.",
            "Self-referred because of feeling flat and unable to enjoy anything.",
            "Seen at a routine review where PHQ-9 screening was positive.",
            "Attends with sadness after a bereavement that has deepened rather than eased over many months.",
            "Referred by occupational health after a marked fall in motivation and work performance.",
            "Presents with fatigue and poor sleep, and on questioning describes pervasive low mood.",
            "Returns with a recurrence of depressive symptoms after stopping antidepressant treatment.",
        ),
        "symptoms": (
            "Describes depressed mood most of the day, nearly every day, for at least six weeks.",
            "Reports marked loss of interest in activities once enjoyed, including music and sport.",
            "PHQ-9 score of 18, in the moderately severe range.",
            "Feels worthless and excessively guilty about letting others down.",
            "Thinking feels slowed, and even small decisions are hard to make.",
            "Energy is so low that ordinary tasks feel exhausting.",
            "Mood is worst in the mornings and lifts slightly by the evening.",
            "Describes feeling empty and tearful, with little hope that things will improve.",
            "Family have noticed slowed speech and movement.",
        ),
        "function": (
            "Wakes in the early hours and cannot get back to sleep.",
            "Appetite is poor and there has been noticeable weight loss.",
            "Has taken sick leave from work and spends much of the day in bed.",
            "Has stopped seeing friends and no longer answers messages.",
            "Sleeps far longer than usual but wakes unrefreshed, and appetite has increased.",
            "Personal care and household tasks have been neglected for several weeks.",
            "Concentration is poor, making it hard to read or follow conversations.",
            "Still working, but describes going through the motions and struggling to finish tasks.",
        ),
        "risk": (
            "Reports occasional passive thoughts that life is not worth living, with no plan or intent.",
            "Denies suicidal ideation or self-harm, and protective factors include children and faith.",
            "No current suicidal intent; risk is assessed as low to moderate and will be reviewed.",
            "C-SSRS indicates a wish to be dead without active suicidal thoughts.",
            "No history of self-harm, and safety information and crisis contacts were provided.",
            "Denies any plan to end life and names family as a reason to keep going.",
            "Hopelessness is present, so risk will be reassessed at each contact.",
            "No thoughts of harming self or others were disclosed on direct questioning.",
        ),
        "impression": (
            "Presentation meets criteria for a major depressive episode of moderate severity.",
            "Features are those of a moderate depressive episode without psychotic features.",
            "Findings are consistent with recurrent major depressive disorder, current episode moderate.",
            "Severe depressive episode with marked functional impairment and no psychotic symptoms.",
            "Symptoms go beyond a normal grief reaction and meet criteria for major depression.",
            "The clinical picture is of a depressive episode with melancholic features.",
            "Mild to moderate depressive episode with no history suggestive of bipolar disorder.",
            "Major depressive disorder, single episode, with prominent anhedonia.",
        ),
        "plan": (
            "Offered a course of cognitive behavioural therapy with behavioural activation.",
            "Started an SSRI, advised that benefit may take several weeks, and booked review in two weeks.",
            "Referred for psychological therapy and given guidance on sleep and activity scheduling.",
            "Antidepressant dose increased after a partial response, with PHQ-9 to be repeated at review.",
            "Discussed combined medication and psychotherapy given the severity of symptoms.",
            "Referred to the community mental health team for further assessment and support.",
            "Encouraged structured daily activity and gentle exercise alongside talking therapy.",
            "Safety-net advice given and follow-up booked within two weeks.",
        ),
    },
    "Stress": {
        "reason": (
            "Presents feeling overwhelmed after a recent redundancy and financial pressure.",
            "Referred by occupational health with exhaustion linked to long working hours.",
            "Attends after a divorce, reporting difficulty coping with the changes.",
            "Self-referred while caring for a parent with dementia alongside a full-time job.",
            "Seen during an exam period with tension, irritability and poor sleep.",
            "Presents after a house move and a new job, describing feeling stretched thin.",
            "Referred after a period of workplace conflict and a heavy caseload.",
            "Attends reporting burnout after months of covering for staff shortages.",
            "Seen after a relative's sudden illness, struggling to balance hospital visits and work.",
        ),
        "symptoms": (
            "Describes irritability, tension headaches and feeling constantly under pressure.",
            "PSS-10 score is high, reflecting the current demands.",
            "Symptoms began within weeks of the stressor and rise and fall with it.",
            "Reports feeling emotionally drained, cynical about work and less effective.",
            "Preoccupied with the situation and finds it hard to switch off in the evenings.",
            "Mood dips at times but lifts on days away from the stressor.",
            "Notices muscle tension, jaw clenching and an upset stomach during busy periods.",
            "Feels tearful and short-tempered but still enjoys time with family.",
            "Does not describe persistent low mood or loss of interest outside the stressful situation.",
        ),
        "function": (
            "Sleep is disrupted before working days but recovers on days off.",
            "Appetite is variable, with more snacking and skipped meals.",
            "Still working but taking work home and cutting back on exercise.",
            "Has had a few days off sick with headaches and fatigue.",
            "Social life has narrowed through lack of time and energy.",
            "Alcohol intake has crept up in the evenings as a way to unwind.",
            "Concentration slips when tired, but usual tasks still get done.",
            "Relationships at home are strained by irritability and long hours.",
        ),
        "risk": (
            "Denies suicidal thoughts and wants practical help to manage the situation.",
            "No thoughts of self-harm and good support from friends, so risk is low.",
            "C-SSRS screen is negative, with clear plans for when the pressure eases.",
            "No history of self-harm and no current risk to self or others.",
            "Feels overwhelmed at times but denies any wish to die.",
            "Risk assessed as low, with a supportive partner and stable housing as protective factors.",
            "No suicidal ideation, though alcohol use was discussed as a risk to monitor.",
            "No hopelessness, and there is clear motivation to make changes.",
        ),
        "impression": (
            "Presentation is consistent with an adjustment disorder in response to identifiable stressors.",
            "Features are those of work-related stress and burnout rather than a depressive disorder.",
            "Stress reaction in proportion to circumstances, not meeting criteria for an anxiety or depressive disorder.",
            "Findings fit occupational burnout as described in ICD-11, with no underlying mood disorder.",
            "Situational stress with preserved functioning, expected to settle as circumstances change.",
            "Adjustment disorder with mixed anxiety and low mood, of mild severity.",
            "Symptoms are time-limited and tied to the stressor, without features of a major depressive episode.",
            "Caregiver strain with stress symptoms that do not amount to a mental disorder.",
        ),
        "plan": (
            "Discussed stress management, including problem solving and protected time for rest.",
            "Advised a phased reduction in workload, to be agreed with the employer through occupational health.",
            "Referred for brief counselling and given information on carer support services.",
            "Provided a fit note for a short period of leave with a planned return to work.",
            "Encouraged regular exercise, limited alcohol and a consistent sleep routine.",
            "Signposted to the employee assistance programme and a stress management course.",
            "Review in four weeks, with rescreening for depression and anxiety if symptoms persist.",
            "Taught relaxation and time-management strategies, with written self-help material.",
        ),
    },
    "Suicidal": {
        "reason": (
            "Brought to the emergency department by ambulance after an intentional overdose of prescribed tablets.",
            "Referred urgently by the general practitioner after disclosing thoughts of ending their life.",
            "Presents in crisis after a relationship breakdown, stating a wish not to be alive.",
            "Seen by the liaison psychiatry team following deliberate self-poisoning.",
            "Called a crisis line reporting intense suicidal thoughts and was asked to attend.",
            "Referred by a family member who found a written goodbye note.",
            "Self-presented to the emergency department after going to a high place intending to jump.",
            "Reviewed on the ward after telling nursing staff of a wish to die.",
        ),
        "symptoms": (
            "Describes daily thoughts of suicide over the past two weeks, growing in intensity.",
            "Feels hopeless and believes others would be better off without them.",
            "Has researched methods online and made a specific plan.",
            "Reports a previous suicide attempt by overdose several years ago.",
            "Suicidal thoughts are persistent and hard to dismiss, with a sense of being trapped.",
            "C-SSRS indicates active suicidal ideation with intent and a plan.",
            "Has been stockpiling medication and giving away possessions.",
            "Describes feeling a burden to family and an unbearable emotional pain.",
            "Self-harm by cutting has become more frequent in recent weeks.",
        ),
        "function": (
            "Barely sleeping and has not eaten properly for several days.",
            "Has stopped going to work and is isolating at home.",
            "Has been drinking heavily over the past week, which increases impulsivity.",
            "Recently lost a job and faces eviction, with mounting debts.",
            "Has withdrawn from friends and stopped answering the phone.",
            "Sleep is severely disrupted, and the patient appears exhausted at interview.",
            "A recent bereavement has left them living alone with little contact.",
            "Unable to manage daily tasks, with family providing food and supervision.",
        ),
        "risk": (
            "Risk of suicide is assessed as high given intent, plan, access to means and a recent attempt.",
            "Expresses regret at having been found and stopped, and risk remains high.",
            "Ambivalent about dying but unable to commit to keeping safe.",
            "Has access to stored medication, which the family agreed to remove.",
            "Protective factors are limited, though a pet and a sibling are mentioned as reasons to stay.",
            "Acute risk is high, and long-term risk is raised by previous attempts and substance use.",
            "Able to engage in safety planning and names reasons for living, which lowers immediate risk.",
            "Denies current intent after de-escalation but remains at elevated risk.",
        ),
        "impression": (
            "Active suicidal ideation with intent in the context of a severe depressive episode.",
            "High risk of suicide, requiring urgent intervention and close supervision.",
            "Suicidal crisis precipitated by an acute interpersonal loss.",
            "Suicidal ideation with recent escalation, needing specialist assessment before any discharge.",
            "Recurrent suicidal ideation with escalating self-harm, requiring close follow-up.",
            "Acute suicidal crisis with hopelessness and access to lethal means.",
            "Suicidal ideation with a specific plan, meeting the threshold for crisis team involvement.",
            "Long-standing suicidal thoughts with an acute rise in risk after recent stressors.",
        ),
        "plan": (
            "Admitted to the inpatient unit on close observation for safety.",
            "Referred to the crisis resolution and home treatment team for daily contact.",
            "Collaborative safety plan completed, covering warning signs, coping steps and crisis contacts.",
            "Means restriction discussed with family, who will remove medication and sharp objects.",
            "Follow-up arranged within two days of discharge, in line with guidance.",
            "Medically cleared by the emergency team before psychiatric review.",
            "Offered psychological therapy focused on suicidal thoughts, with crisis contacts provided.",
            "Psychiatric review arranged, and family informed and involved with consent.",
        ),
    },
}

# Note structures: (heading or None to continue the previous one, part, optional). Optional sentences
# are dropped, at random, until a note has at most MAX_SENTENCES sentences and MAX_WORDS words.
_STRUCTURES = (
    (  # narrative
        ("", "reason", False),
        (None, "symptoms", False),
        (None, "function", True),
        (None, "shared", True),
        (None, "risk", False),
        (None, "plan", False),
    ),
    (  # headed
        ("History:", "reason", False),
        (None, "symptoms", False),
        (None, "function", True),
        ("Mental state:", "mse", True),
        ("Risk:", "risk", False),
        ("Impression:", "impression", False),
        ("Plan:", "plan", True),
    ),
    (  # SOAP-like
        ("Subjective:", "reason", False),
        (None, "symptoms", False),
        (None, "function", True),
        ("Assessment:", "impression", False),
        (None, "risk", True),
        ("Plan:", "plan", False),
    ),
    (  # brief
        ("", "reason", False),
        (None, "symptoms", True),
        (None, "risk", False),
        (None, "impression", False),
        (None, "plan", True),
    ),
)


def _sentence(label: str, part: str, rng: np.random.Generator) -> str:
    if part in _SHARED:
        pool = _SHARED[part]
    else:
        source = label
        if part in _BORROWABLE and _RELATED[label] and rng.random() < BORROW_P:
            source = _RELATED[label][rng.integers(len(_RELATED[label]))]
        pool = _POOLS[source][part]
    return pool[rng.integers(len(pool))]


def _note(label: str, rng: np.random.Generator) -> str:
    structure = _STRUCTURES[rng.integers(len(_STRUCTURES))]
    rows = [(heading, _sentence(label, part, rng), optional) for heading, part, optional in structure]

    def words(rows):
        return sum(len(f"{h or ''} {s}".split()) for h, s, _ in rows)

    while len(rows) > MAX_SENTENCES or words(rows) > MAX_WORDS:
        optional = [i for i, (_, _, opt) in enumerate(rows) if opt]
        if not optional:
            break
        i = optional[rng.integers(len(optional))]
        heading = rows[i][0]
        del rows[i]
        if heading and i < len(rows) and rows[i][0] is None:  # keep the heading on the next sentence
            rows[i] = (heading, *rows[i][1:])
    return " ".join(f"{h} {s}" if h else s for h, s, _ in rows)


def make_public_notes(count: int, *, seed: int) -> list[tuple[str, str]]:
    """`count` (label, text) public teaching-case notes, balanced over the classes, shuffled by `seed`."""
    if count < 1:
        raise FedgenError(f"make_public_notes needs count >= 1, got {count}")
    rng = np.random.default_rng(seed)
    classes = list(MENTAL_HEALTH_CLASSES)
    labels = [classes[i % len(classes)] for i in rng.permutation(count)]
    return [(label, _note(label, rng)) for label in labels]
