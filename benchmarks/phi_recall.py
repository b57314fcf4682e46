"""PHI detector recall per identifier kind, precision and speed on corpora fedgen did not write.

    nice -n 10 .venv/bin/python -m benchmarks.phi_recall --split eval

The corpora (benchmarks/phi_corpora.py) come from mimesis and from presidio-evaluator's
templates and FakeNameGenerator records; the detector's lists come from Faker, GeoNames and
Webster's word list, its NER from spaCy's en_core_web_sm (OntoNotes). No source is shared: a
name the detector finds in the evaluation was not put there from its own list (the share of
evaluation name words that happen to be in the detector's lists is printed beside recall).
Rules were iterated on the ``dev`` split only (other mimesis locales, other templates, other
FakeNameGenerator records); the ``eval`` split is the held-out figure. ``--misses`` prints
missed spans, and refuses to on the eval split.

A truth span counts as found when findings of any PHI type cover every letter and digit of it
("covered", the headline: a release that replaces findings leaves nothing of it); "touched"
counts any overlap, "typed" requires a finding of the span's own type (or the address that
contains a postal code or city). Precision is the share of findings that overlap a PHI span.
Speed is texts per second of ``scan`` alone (the analyzer is built first) in ``--processes``
processes, wall-clock on this machine as it is (label a figure measured while other work runs
as loaded), and texts per CPU-second of the scanning processes together (less sensitive to load:
on N idle cores the wall figure approaches N times it, less the forking).

Benchmark-only packages: ``pip install --no-deps mimesis==22.2.0 presidio-evaluator==0.3.2``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter, defaultdict

from benchmarks.phi_corpora import KINDS, NOT_PHI, clinical_corpus, general_corpus
from fedgen.audits.phi import build_analyzer, scan
from fedgen.audits.phi_lexicon import fold, lexicon

CORPORA = {"clinical": clinical_corpus, "general": general_corpus}
# A finding of the key type also counts as the right type for these truth kinds.
TYPE_COVERS = {"STREET_ADDRESS": {"POSTAL_CODE", "LOCATION"}}


def _alnum_positions(text: str, start: int, end: int) -> set[int]:
    return {i for i in range(start, end) if text[i].isalnum()}


def score(notes, findings) -> dict:
    by_index = defaultdict(list)
    for f in findings:
        by_index[f.index].append(f)
    per_kind = defaultdict(Counter)
    false_positives = 0
    for index, note in enumerate(notes):
        found = by_index[index]
        phi_spans = [s for s in note.spans if s["entity_type"] != NOT_PHI]
        for span in phi_spans:
            kind = span["entity_type"]
            need = _alnum_positions(note.text, span["start"], span["end"])
            overlapping = [f for f in found if f.start < span["end"] and span["start"] < f.end]
            covered = set().union(*(set(range(f.start, f.end)) for f in overlapping)) if overlapping else set()
            typed = [f for f in overlapping if f.entity_type == kind or kind in TYPE_COVERS.get(f.entity_type, ())]
            typed_cover = set().union(*(set(range(f.start, f.end)) for f in typed)) if typed else set()
            per_kind[kind]["n"] += 1
            per_kind[kind]["touched"] += bool(overlapping)
            per_kind[kind]["covered"] += need <= covered
            per_kind[kind]["typed"] += need <= typed_cover
        for f in found:
            if not any(f.start < s["end"] and s["start"] < f.end for s in phi_spans):
                false_positives += 1
    total = Counter()
    for counts in per_kind.values():
        total.update(counts)
    n_findings = len(findings)
    return {
        "kinds": {k: dict(per_kind[k]) for k in KINDS if per_kind[k]["n"]},
        "total": dict(total),
        "precision": (n_findings - false_positives) / n_findings if n_findings else None,
        "n_findings": n_findings,
    }


def name_overlap(notes) -> float:
    """Share of the corpus' PERSON words that are in the detector's name lists."""
    words = lexicon()
    tokens = [fold(w) for n in notes for s in n.spans if s["entity_type"] == "PERSON" for w in s["value"].split()]
    return sum(words.is_name(t) for t in tokens) / max(len(tokens), 1)


def misses(notes, findings, limit: int) -> list[str]:
    by_index = defaultdict(list)
    for f in findings:
        by_index[f.index].append(f)
    lines = []
    for index, note in enumerate(notes):
        for span in note.spans:
            if span["entity_type"] == NOT_PHI:
                continue
            need = _alnum_positions(note.text, span["start"], span["end"])
            covered = set()
            for f in by_index[index]:
                covered |= set(range(f.start, f.end))
            if not need <= covered:
                lines.append(f"MISS {span['entity_type']:<22} {span['value']!r}  in: {note.text!r}")
        for f in by_index[index]:
            if not any(f.start < s["end"] and s["start"] < f.end for s in note.spans if s["entity_type"] != NOT_PHI):
                lines.append(f"FP   {f.entity_type:<22} {note.text[f.start : f.end]!r}  in: {note.text!r}")
    return lines[:limit]


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the scan's forked workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _ratio(counts: dict, key: str) -> str:
    return f"{counts[key] / counts['n']:.3f}" if counts.get("n") else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=["dev", "eval"], default="eval")
    parser.add_argument("--corpus", choices=sorted(CORPORA), action="append")
    parser.add_argument("--n", type=int, default=600, help="texts per corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacy-model", default=None)
    parser.add_argument("--no-ner", action="store_true", help="rules and lists only (blank pipeline)")
    parser.add_argument("--processes", type=int, default=1, help="processes that scan (forked)")
    parser.add_argument(
        "--misses", type=int, default=0, help="print this many misses and false positives (dev split only)"
    )
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    if args.misses and args.split == "eval":
        parser.error("--misses is for the dev split: the eval split is held out")

    t0 = time.perf_counter()
    analyzer = build_analyzer(spacy_model=args.spacy_model, statistical_ner=not args.no_ner)
    build_s = time.perf_counter() - t0
    print(f"engine: {analyzer.engine} (built in {build_s:.1f} s)")
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    figures = {"engine": analyzer.engine, "split": args.split, "n": args.n, "processes": args.processes, "corpora": {}}
    for name in args.corpus or sorted(CORPORA):
        notes = CORPORA[name](args.split, n=args.n, seed=args.seed)
        texts = [n.text for n in notes]
        scan(analyzer, texts[:20])  # warm-up
        t0, c0 = time.perf_counter(), _cpu_seconds()
        findings = scan(analyzer, texts, processes=args.processes)
        seconds, cpu_seconds = time.perf_counter() - t0, _cpu_seconds() - c0
        result = score(notes, findings)
        result["texts_per_s"] = len(texts) / seconds
        result["texts_per_cpu_s"] = len(texts) / cpu_seconds
        result["name_words_in_detector_lists"] = name_overlap(notes)
        result["load_average_after"] = os.getloadavg()[0]
        figures["corpora"][name] = result
        total = result["total"]
        print(f"\n{name} ({args.split}, {len(texts)} texts, {total['n']} PHI spans): "
              f"{result['texts_per_s']:.0f} texts/s wall in {args.processes} process(es), {result['texts_per_cpu_s']:.0f} per CPU-second, "
              f"load average {result['load_average_after']:.2f}")  # fmt: skip
        print(f"{'kind':<22} {'n':>5} {'covered':>8} {'touched':>8} {'typed':>8}")
        for kind, counts in result["kinds"].items():
            print(
                f"{kind:<22} {counts['n']:>5} {_ratio(counts, 'covered'):>8} {_ratio(counts, 'touched'):>8} {_ratio(counts, 'typed'):>8}"
            )
        print(
            f"{'ALL':<22} {total['n']:>5} {_ratio(total, 'covered'):>8} {_ratio(total, 'touched'):>8} {_ratio(total, 'typed'):>8}"
        )
        precision = result["precision"]
        print(f"precision {precision:.3f} ({result['n_findings']} findings); "
              f"name words also in the detector's lists: {result['name_words_in_detector_lists']:.2f}")  # fmt: skip
        if args.misses:
            print("\n".join(misses(notes, findings, args.misses)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=1)


if __name__ == "__main__":
    main()
