"""The subject of an edit request, located in its prompt without a tokenizer or torch (MEMIT, EMMET).

MEMIT and EMMET edit at the last token of the subject; `subject_end` finds where the subject ends in
the prompt, as characters, so that preflight (before the model loads) and the editors (with the
tokenizer's offsets) agree on it.
"""
import re
import unicodedata
from dataclasses import dataclass

from data.records import DataError, EditRecord


@dataclass(frozen=True)
class Request:
    """One edit; `end` is the character index just past the subject's first mention in `prompt`."""

    prompt: str
    subject: str
    answer: str | bool
    end: int


def requests(records: list[EditRecord], path: str, editor: str) -> list[Request]:
    """The records as requests; DataError naming file, record and field if a subject cannot be located."""
    out = []
    for r in records:
        if r.subject is None:
            raise DataError(path, r.index, "subject", f"missing: {editor} edits at the last token of the subject, "
                            "which the MEND/MEMIT zsRE format gives ({subject, src, ...}); this record has none")
        end = subject_end(r.prompt, r.subject.strip())
        if end is None:
            raise DataError(path, r.index, "subject", f"{r.subject!r} does not occur in the prompt {r.prompt!r}, "
                            f"so {editor} cannot find its last token")
        out.append(Request(r.prompt, r.subject.strip(), r.answer, end))
    return out


def subject_end(prompt: str, subject: str) -> int | None:
    """End of the subject's first mention in `prompt`: as a whole word, else as a substring, else ignoring
    case ("the Beatles" in "The Beatles ..."); None if absent. The subject is also looked for in its NFC
    and NFD forms (a composed "ý" or "y" + combining acute), and the end takes in any combining marks
    that follow, so it never splits a character from its accents."""
    forms = list(dict.fromkeys([subject] + [unicodedata.normalize(f, subject) for f in ("NFC", "NFD")]))
    for whole_word, flags in ((True, 0), (False, 0), (True, re.IGNORECASE), (False, re.IGNORECASE)):
        for form in forms:
            for found in re.finditer(re.escape(form), prompt, flags):
                start, end = found.span()
                if whole_word and not (_boundary(prompt, start - 1) and _boundary(prompt, end)):
                    continue
                while end < len(prompt) and unicodedata.category(prompt[end]).startswith("M"):
                    end += 1  # combining marks belong to the character before them
                return end
    return None


def _boundary(text: str, i: int) -> bool:
    """Whether text[i] does not continue a word (letters, digits, _ and combining marks do)."""
    return not 0 <= i < len(text) or not (text[i].isalnum() or text[i] == "_"
                                         or unicodedata.category(text[i]).startswith("M"))
