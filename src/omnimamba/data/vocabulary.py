"""Every word the Shapes world writes (captions, questions, answers) and the answer template's words.

The embedded default's text tokenizer is built from this list, deterministically and without downloads.
"""

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
SHAPES_PLURAL = ("circles", "squares", "triangles")
SIZES = ("small", "large")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
RELATIONS = ("left", "right", "above", "below")

WORDS = tuple(sorted(set(
    COLORS + SHAPES + SHAPES_PLURAL + SIZES + NUMBERS + RELATIONS + (
        "a", "an", "the", "and", "of", "is", "are", "there", "how", "many", "what", "which", "color",
        "shape", "shapes", "yes", "no", "image", "picture", "in", "on", "to", "with", "this", "it", "they",
        "look", "like", "all", "but", "only", "actually", "none", "object", "objects", "side", "background",
        "describe", "detail", "contains", "shows", "at", "top", "bottom", "center", "middle", "corner",
        "plain", "textured", "gray", "white", "dark", "light", "each", "other", "than",
        "question", "answer", "user", "assistant", "relative", "not", "any", "some", "be", "does", "do", "have", "has",
        "i", "see", "can", "you", "please", "where", "its", "also", "together", "s",
    )
)))
PUNCTUATION = (".", ",", "?", ":", "!", "'", "-")
