"""wordfreq: the most frequent words of the text on standard input.

Usage: wordfreq.py [N]    (N: how many words to list, default 10)

Prints one line per word, most frequent first (ties in alphabetical order): the count, a tab,
the word. Words are runs of letters, digits and apostrophes, case-folded; the stop words of
textstats.STOP_WORDS are left out.
"""

import sys

import textstats


def main(argv):
    if len(argv) > 2 or (len(argv) == 2 and not argv[1].isdigit()):
        print("usage: wordfreq.py [N]", file=sys.stderr)
        return 2
    top = int(argv[1]) if len(argv) == 2 else 10
    counts = textstats.count_words(sys.stdin.read())
    for word, count in textstats.most_common(counts, top):
        print(f"{count}\t{word}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
