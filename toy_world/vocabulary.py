"""The toy world's caption words: the grammar's attribute words and the filler words around them.

Kept apart from ``scenes`` (which renders and captions with them, and re-exports them) so that ``tokenizer``,
which makes each of them one token, can import them without importing ``scenes``, which imports ``tokenizer``.
"""

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")  # rows of scenes.PALETTE
PATTERNS = ("", "striped", "dotted")  # index 0 = plain (no adjective)
FILLER_WORDS = ("a", "and", "on", "background")
WORDS = FILLER_WORDS + SHAPES + COLOURS + PATTERNS[1:]  # every grammar word
