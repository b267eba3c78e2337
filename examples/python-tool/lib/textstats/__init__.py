"""textstats: a tiny pure-Python package that wordfreq.py imports from PYTHONPATH."""

import re

# Words too common to be worth counting.
STOP_WORDS = frozenset("a an and are as at be by for from in is it of on or that the to was with".split())

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def words(text):
    """The words of `text`, case-folded, stop words left out."""
    for match in _WORD.finditer(text):
        word = match.group().casefold()
        if word not in STOP_WORDS:
            yield word


def count_words(text):
    """A dict from each word of `text` to how often it occurs."""
    counts = {}
    for word in words(text):
        counts[word] = counts.get(word, 0) + 1
    return counts


def most_common(counts, n):
    """The `n` most frequent (word, count) pairs, ties in alphabetical order."""
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]
